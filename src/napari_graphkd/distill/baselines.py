"""Published dense-prediction knowledge-distillation baselines (docs/method.md, "Baselines"), teacher always detached.

Where each is applied is decided in :mod:`.objective` (see ``distillation_resolutions``):
mimicry on the final embedding at input resolution; AT, SKD and CWD on decoder stages matched
by spatial size. Student/teacher spatial sizes may differ: the student side is resized.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _resize_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear (trilinear) resize of (B,C,*spatial) to ``size`` (no-op when equal)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear" if x.dim() == 4 else "trilinear", align_corners=False)


def mimic_loss(emb_s: torch.Tensor, emb_t: torch.Tensor) -> torch.Tensor:
    """Mimicry (Li, Jin & Yan, "Mimicking very efficient network for object detection", CVPR 2017): MSE of raw embeddings."""
    return F.mse_loss(emb_s.float(), emb_t.detach().float())


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention (B,1,H,W) of Zagoruyko & Komodakis: channel mean of |F|^p."""
    return feat.float().abs().pow(p).mean(dim=1, keepdim=True)


def attention_transfer_loss(feat_s: torch.Tensor, feat_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), one stage: MSE of L2-normalised flattened maps.

    As their released ``at_loss``: ``(at(s) - at(t)).pow(2).mean()``; channel counts may differ.
    The student map is resized to the teacher's size if needed. Sum it over stages (their β/2 Σ_j).
    """
    a_t = attention_map(feat_t.detach(), p)
    a_s = _resize_to(attention_map(feat_s, p), a_t.shape[2:])
    return (F.normalize(a_s.flatten(1), dim=1) - F.normalize(a_t.flatten(1), dim=1)).pow(2).mean()


def _pairwise_similarity(feat: torch.Tensor) -> torch.Tensor:
    """All-pairs cosine similarity (B,P,P) of the spatial positions of (B,C,h,w) (SKD: detached norms)."""
    f = feat.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True).detach() + 1e-8)
    return torch.einsum("bcm,bcn->bmn", f, f)


def skd_pairwise_loss(feat_s: torch.Tensor, feat_t: torch.Tensor, pool: int = 16) -> torch.Tensor:
    """Structured KD pairwise term (Liu et al., CVPR 2019): MSE of all-pairs cosine similarity matrices.

    Both maps are max-pooled to a ``pool``×``pool`` grid of nodes (their code pools with patches of
    a fixed fraction of the map, i.e. a fixed grid too), so sizes and channel counts may differ.
    """
    max_pool = F.adaptive_max_pool2d if feat_s.dim() == 4 else F.adaptive_max_pool3d
    s = max_pool(feat_s.float(), pool)
    t = max_pool(feat_t.detach().float(), pool)
    return ((_pairwise_similarity(s) - _pairwise_similarity(t)) ** 2).mean()


def cwd_loss(feat_s: torch.Tensor, feat_t: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021): per-channel spatial softmax, KL(T‖S)·τ².

    Averaged over channels and batch. Channel counts must match (use an :class:`Adapter`);
    the student map is resized to the teacher's size if needed.
    """
    t = feat_t.detach().float()
    s = _resize_to(feat_s.float(), t.shape[2:])
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"cwd_loss needs equal channels (student {s.shape[1]}, teacher {t.shape[1]}): use an Adapter")
    log_p_t = F.log_softmax(t.flatten(2) / tau, dim=2)
    log_p_s = F.log_softmax(s.flatten(2) / tau, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=2)
    return kl.mean() * tau**2


class Adapter(nn.Module):
    """Learned 1×1 conv from student to teacher channels for feature-level baselines (docs/method.md, "Deviations from the published code").

    Trained with the student (pass it to the optimiser), dropped at export; never re-drawn per
    iteration as the released code's random projections.
    """

    def __init__(self, in_channels: int, out_channels: int, ndim: int = 2):
        super().__init__()
        self.proj = {2: nn.Conv2d, 3: nn.Conv3d}[ndim](in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
