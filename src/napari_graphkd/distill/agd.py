"""Intra-image affinity graph distillation (AGD, docs/method.md, "Distillation"; invalid pairs excluded), 2D or 3D."""
from __future__ import annotations

import torch

from ..affinity import Offsets, embedding_affinities, validity_mask


def agd_loss(emb_t: torch.Tensor, emb_s: torch.Tensor, offsets: Offsets | None = None,
             affinities_s: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of student vs teacher cosine affinities over valid pairs, summed over offsets, / (B * pixels).

    Embeddings are (B,C,H,W) or (B,C,D,H,W); ``offsets`` None = the defaults of that dimensionality.

    Only pairs whose partner lies inside the image count (the released code's roll wrap-around
    pairs are not distilled, docs/method.md, "Deviations from the published code"). ``affinities_s`` reuses the student affinities
    the segmentation loss already computed.
    """
    a_t = embedding_affinities(emb_t.detach(), offsets)
    a_s = embedding_affinities(emb_s, offsets) if affinities_s is None else affinities_s.float()
    valid = torch.from_numpy(validity_mask(a_s.shape[2:], offsets)).to(a_s.device)
    return ((a_s - a_t) ** 2 * valid).sum() / a_s[:, 0].numel()
