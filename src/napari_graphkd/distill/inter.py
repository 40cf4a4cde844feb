"""Inter-image distillation against a memory bank of teacher crops (METHOD.md §5.2, §5.3).

Normalisation choices (weights stay 1, as in the released configs):

* Inter-IGD uses the *intended* bipartite formula of §5.2, not the released cumulative
  concatenation: each current image b and memory item m give
  ``L(b,m) = 1/(N_b N_m) Σ_ij (cos(v_i^T,u_j) − cos(v_i^S,u_j))²``. The factor 2 of §5.2 is dropped:
  it only compensates the released code counting both orientations of a masked N×N matrix,
  while the bipartite N_b×N_m matrix is computed once here. ``L`` is averaged over (b,m) pairs.
* Inter-AGD is averaged over (b,m) pairs, not summed: the released sum (×K on BBBC/C. elegans,
  B/K on CVPPP) makes the weight depend on batch and sample sizes. At equal weight our inter-AGD
  is B·K times smaller than the BBBC/C. elegans trainers' sum and our inter-IGD 2B times smaller
  than the released (1/K)·Σ_b Σ_m 2·L(b,m); the weight sweeps of METHOD.md A.9 absorb that.
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
    """L2-normalise (B,C,H,W) along C, average-pool (kernel = stride = pool, ceil_mode): (B,P,C)."""
    e = F.avg_pool2d(F.normalize(embeddings.float(), dim=1), pool, stride=pool, ceil_mode=True)
    return e.flatten(2).transpose(1, 2)


def inter_agd_loss(memory_embeddings: Sequence[torch.Tensor], emb_t: torch.Tensor, emb_s: torch.Tensor, pool: int = 7) -> torch.Tensor:
    """Inter-image AGD: MSE of memory×current pooled-affinity matrices (S vs T), mean over (b,m) pairs.

    ``memory_embeddings`` are (C,H,W) teacher embeddings of any size; ``emb_t``/``emb_s`` (B,C,H,W).
    """
    if len(memory_embeddings) == 0:
        raise ValueError("inter_agd_loss needs at least one memory embedding")
    p_t = _pooled_vectors(emb_t.detach(), pool)
    p_s = _pooled_vectors(emb_s, pool)
    losses = []
    for mem in memory_embeddings:
        p_m = _pooled_vectors(mem[None].to(p_s.device), pool)[0]
        c_t = torch.einsum("pc,bqc->bpq", p_m, p_t)
        c_s = torch.einsum("pc,bqc->bpq", p_m, p_s)
        losses.append(((c_s - c_t) ** 2).mean(dim=(1, 2)))
    return torch.cat(losses).mean()
