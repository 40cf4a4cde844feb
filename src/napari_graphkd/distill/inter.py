"""Inter-image distillation against a memory bank of teacher crops (docs/method.md, "Distillation").

Normalisation choices (weights stay 1, as in the released configs):

* Inter-IGD uses the *intended* bipartite formula, not the released cumulative
  concatenation: each current image b and memory item m give
  ``L(b,m) = 1/(N_b N_m) Σ_ij (cos(v_i^T,u_j) − cos(v_i^S,u_j))²``. The released factor 2 is dropped:
  it only compensates the released code counting both orientations of a masked N×N matrix,
  while the bipartite N_b×N_m matrix is computed once here. ``L`` is averaged over (b,m) pairs.
* Inter-AGD is averaged over (b,m) pairs, not summed: the released sum (×K on BBBC/C. elegans,
  B/K on CVPPP) makes the weight depend on batch and sample sizes. At equal weight our inter-AGD
  is B·K times smaller than the BBBC/C. elegans trainers' sum and our inter-IGD 2B times smaller
  than the released (1/K)·Σ_b Σ_m 2·L(b,m); the weight sweeps (docs/method.md, "Benchmark protocol") absorb that.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .igd import cosine_matrix


def _pair_losses(vt: torch.Tensor, vs: torch.Tensor, memory_nodes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per memory item (node, edge) losses (M,) of one current image against non-empty memory node sets."""
    counts = torch.tensor([len(u) for u in memory_nodes], device=vs.device)
    u = torch.cat(list(memory_nodes)).to(vs.device).detach()
    sq = (cosine_matrix(vt.detach(), u) - cosine_matrix(vs, u)) ** 2  # (N_b, ΣN_m), block m = item m
    owner = torch.repeat_interleave(torch.arange(len(counts), device=vs.device), counts)
    per_item = sq.new_zeros(len(counts)).index_add(0, owner, sq.sum(0))
    edge = per_item / (len(vs) * counts)
    # The released node term on [current ∪ memory] nodes: memory nodes are equal in T and S, so they
    # only enlarge the mean's denominator. Disabled (weight 0) in every released config.
    node = (vt.detach() - vs).norm(dim=1).sum() / (len(vs) + counts)
    return node, edge


def inter_igd_loss(
    nodes_t: Sequence[torch.Tensor], nodes_s: Sequence[torch.Tensor], memory_nodes: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inter-image IGD (node, edge): mean over (current image, memory item) pairs that both have instances.

    ``nodes_t``/``nodes_s`` are per-image (N_b,C) teacher/student nodes, ``memory_nodes`` the
    (N_m,C) teacher nodes of the sampled memory items. Grad-connected zeros if no pair qualifies.
    """
    memory = [u for u in memory_nodes if len(u) > 0]
    pairs = [_pair_losses(vt, vs, memory) for vt, vs in zip(nodes_t, nodes_s) if len(vs) > 0 and memory]
    if not pairs:
        zero = torch.stack([vs.sum() for vs in nodes_s]).sum() * 0
        return zero, zero
    node = torch.cat([p[0] for p in pairs]).mean()
    edge = torch.cat([p[1] for p in pairs]).mean()
    return node, edge


def _pooled_vectors(embeddings: torch.Tensor, pool: int) -> torch.Tensor:
    """L2-normalise (B,C,*spatial) along C, average-pool (kernel = stride = pool per axis, ceil_mode): (B,P,C).

    An axis shorter than ``pool`` (a thin volume's z) is averaged whole.
    """
    avg_pool = F.avg_pool2d if embeddings.dim() == 4 else F.avg_pool3d
    kernel = tuple(min(pool, n) for n in embeddings.shape[2:])
    e = avg_pool(F.normalize(embeddings.float(), dim=1), kernel, stride=kernel, ceil_mode=True)
    return e.flatten(2).transpose(1, 2)


def pooled_gram(embedding: torch.Tensor, pool: int = 7) -> torch.Tensor:
    """(C,C) second-moment matrix P^T P / |P| of a (C,*spatial) embedding's pooled normalised vectors P.

    It is all inter-image AGD needs from a memory item (see :func:`inter_agd_loss`), so the memory
    bank computes it once at push time instead of re-pooling every item at every step.
    """
    p = _pooled_vectors(embedding.detach()[None], pool)[0]
    return p.t() @ p / len(p)


def inter_agd_loss(memory_grams: Sequence[torch.Tensor], emb_t: torch.Tensor, emb_s: torch.Tensor, pool: int = 7) -> torch.Tensor:
    """Inter-image AGD: MSE of memory×current pooled-affinity matrices (S vs T), mean over (b,m) pairs.

    With P_m the memory item's pooled vectors and d_q = p^S_q - p^T_q the current image's pooled
    differences, mean_{p,q} (P_m d_q)_p^2 = mean_q d_q^T G_m d_q with G_m = P_m^T P_m / |P_m|
    (:func:`pooled_gram`): the same number as building the |P_m| x |Q| matrices, in O(Q C^2).
    """
    if len(memory_grams) == 0:
        raise ValueError("inter_agd_loss needs at least one memory item")
    d = _pooled_vectors(emb_s, pool) - _pooled_vectors(emb_t.detach(), pool)
    grams = torch.stack([g.to(d.device, d.dtype) for g in memory_grams])
    per_pair = torch.einsum("bqc,mcd,bqd->bm", d, grams, d) / d.shape[1]
    return per_pair.mean()
