"""Intra-image instance graph distillation (IGD, docs/method.md, "Distillation"); images and volumes alike.

Nodes are the mean *raw* embeddings of the ground-truth instances (background id 0 excluded);
edges are cosine similarities between nodes. The teacher side is always detached.
"""
from __future__ import annotations

import torch

_EPS = 1e-8  # added to node norms, as the released code's ``L2``


def resize_labels(labels: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-resize integer label maps (..., *spatial) to ``size`` (its last len(size) axes); ids kept exactly.

    Source index is floor(i * in / out), the rule of ``F.interpolate(mode="nearest")``, in integers.
    """
    n = len(size)
    shape = labels.shape[-n:]
    if tuple(shape) == tuple(size):
        return labels
    index = [torch.arange(out, device=labels.device) * inp // out for inp, out in zip(shape, size)]
    grids = [i.reshape([-1 if a == axis else 1 for a in range(n)]) for axis, i in enumerate(index)]
    return labels[(..., *grids)]


def instance_nodes(embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean raw embedding (N,C) of each instance id > 0 of ``labels`` (*spatial), in ascending id order.

    Vectorised with ``index_add`` (no loop over instances); ``labels`` are nearest-resized to the
    embedding's (C,*spatial) size when they differ. Returns a grad-connected (0,C) tensor if no instance.
    """
    c, *spatial = embedding.shape
    labels = resize_labels(labels, tuple(spatial)).reshape(-1)
    ids, inverse = torch.unique(labels, return_inverse=True)
    pixels = embedding.float().reshape(c, -1).t()
    sums = pixels.new_zeros((len(ids), c)).index_add(0, inverse, pixels)
    counts = torch.bincount(inverse, minlength=len(ids)).to(sums.dtype)
    return (sums / counts[:, None])[ids != 0]


def batch_nodes(embeddings: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Instance nodes of every image (volume) of a (B,C,*spatial) batch with (B,*spatial) labels."""
    return [instance_nodes(e, lab) for e, lab in zip(embeddings, labels)]


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (N,M) of node sets (N,C), (M,C) with DETACHED norms.

    As the released code: the gradient flows through the dot products only, the
    normalisers are treated as constants.
    """
    a_n = a / (a.norm(dim=1, keepdim=True).detach() + _EPS)
    b_n = b / (b.norm(dim=1, keepdim=True).detach() + _EPS)
    return a_n @ b_n.t()


def edge_matrix(v: torch.Tensor) -> torch.Tensor:
    """Full instance graph (N,N), diagonal included: node cosine similarities with detached norms."""
    return cosine_matrix(v, v)


def node_loss(vt: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """Mean over nodes of the (non-squared) L2 distance between teacher and student nodes."""
    return (vt.detach() - vs).norm(dim=1).mean()


def edge_loss(vt: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """Mean over the N×N entries of the squared difference of teacher and student edge matrices."""
    return ((edge_matrix(vt.detach()) - edge_matrix(vs)) ** 2).mean()


def graph_losses(nodes_t: list[torch.Tensor], nodes_s: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(node, edge) losses averaged over the images that have >= 1 instance.

    With no instance at all both are zeros still connected to the student graph (backward works).
    """
    pairs = [(vt, vs) for vt, vs in zip(nodes_t, nodes_s) if len(vs) > 0]
    if not pairs:
        zero = torch.stack([vs.sum() for vs in nodes_s]).sum() * 0
        return zero, zero
    node = torch.stack([node_loss(vt, vs) for vt, vs in pairs]).mean()
    edge = torch.stack([edge_loss(vt, vs) for vt, vs in pairs]).mean()
    return node, edge


def igd_loss(emb_t: torch.Tensor, emb_s: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intra-image IGD (node, edge) of (B,C,*spatial) teacher/student embeddings with (B,*spatial) instance labels."""
    return graph_losses(batch_nodes(emb_t.detach(), labels), batch_nodes(emb_s, labels))
