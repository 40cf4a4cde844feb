"""One distillation objective: named, weighted, switchable terms (an ablation is a weight set to 0).

Resolution decision for a half-resolution student (``stem_stride == 2``):

* Embedding-level terms (intra AGD, intra IGD, inter-image terms, mimicry) compare student and
  teacher at FULL input resolution, using the student's bilinearly upsampled embedding
  (``EmbeddingUNet.forward``/``forward_padded``): that is the map the product decodes, so its
  affinities and instance means are what must match the teacher; the label maps need no resizing.
* Intermediate-feature baselines (AT, SKD, CWD) compare a student decoder stage with the teacher
  stage of the same spatial size (:func:`match_stages`), so no feature is resampled: AT uses every
  shared stage, SKD and CWD the highest-resolution shared stage (the last one before the head).

:func:`distillation_resolutions` returns the same decision per term.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from ..affinity import Offsets
from .agd import agd_loss
from .baselines import Adapter, attention_transfer_loss, cwd_loss, mimic_loss, skd_pairwise_loss
from .igd import batch_nodes, graph_losses
from .inter import inter_agd_loss, inter_igd_loss
from .memory import MemoryBank

INTER_TERMS: tuple[str, ...] = ("inter_affinity", "inter_node", "inter_edge")
FEATURE_TERMS: tuple[str, ...] = ("at", "skd", "cwd")
# Default weight of each baseline when it is the method (docs/method.md, "Baselines"; the benchmark sweeps them anyway).
BASELINE_WEIGHTS: dict[str, float] = {
    "mimic": 1.0,  # plain MSE, unit weight (Li et al. 2017 use an unweighted L2 mimic loss)
    "at": 500.0,  # Zagoruyko & Komodakis' code: β/2 · Σ_stages at_loss with β = 1e3 (1e4 in some setups)
    "skd": 10.0,  # the weight published for SKD's pairwise term
    "cwd": 3.0,  # Shu et al.'s segmentation default on score maps with τ = 4 (their range: 3-50)
}
METHODS: tuple[str, ...] = ("grd", "grd-intra", "none", "pseudo", *BASELINE_WEIGHTS)


@dataclass(frozen=True)
class DistillWeights:
    """Weight of every distillation term; GRD defaults from the released configs (docs/method.md, "Distillation")."""

    affinity: float = 10.0  # intra-image AGD
    node: float = 0.1  # intra-image IGD node
    edge: float = 0.1  # intra-image IGD edge
    inter_affinity: float = 1.0  # inter-image AGD
    inter_node: float = 0.0  # inter-image IGD node (0 in every released config)
    inter_edge: float = 1.0  # inter-image IGD edge
    mimic: float = 0.0
    at: float = 0.0
    skd: float = 0.0
    cwd: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"weight {f.name} must be >= 0")

    def active(self) -> dict[str, float]:
        """Terms with a positive weight, in declaration order."""
        return {k: v for k, v in asdict(self).items() if v > 0}


def method_weights(method: str) -> DistillWeights:
    """Weights of a named method: ``grd``, ``grd-intra``, ``none``, ``pseudo`` (no terms: the teacher's decoded labels of
    unlabelled images are training targets instead) or one baseline (``mimic``, ``at``, ``skd``, ``cwd``)."""
    off = DistillWeights(**{f.name: 0.0 for f in fields(DistillWeights)})
    if method == "grd":
        return DistillWeights()
    if method == "grd-intra":
        return replace(DistillWeights(), **{k: 0.0 for k in INTER_TERMS})
    if method in ("none", "pseudo"):
        return off
    if method in BASELINE_WEIGHTS:
        return replace(off, **{method: BASELINE_WEIGHTS[method]})
    raise ValueError(f"unknown distillation method {method!r}; known: {', '.join(METHODS)}")


@dataclass
class NetOut:
    """A network's outputs for distillation: full-input-resolution embedding and native decoder features."""

    embedding: torch.Tensor  # (B,C,*spatial) at the resolution where embedding terms compare (input size)
    features: list[torch.Tensor] = field(default_factory=list)  # decoder stages, coarse to fine
    affinities: torch.Tensor | None = None  # (B,K,*spatial) of ``embedding`` if already computed (reused by AGD)


def match_stages(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) feature pairs of equal spatial size, in student order (coarse to fine)."""
    by_size = {tuple(t.shape[2:]): t for t in teacher_feats}
    return [(s, by_size[tuple(s.shape[2:])]) for s in student_feats if tuple(s.shape[2:]) in by_size]


def make_adapter(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> Adapter:
    """Learned 1×1 adapter for the CWD stage (highest-resolution shared stage), from one dry-run's features."""
    pairs = match_stages(student_feats, teacher_feats)
    if not pairs:
        raise ValueError("student and teacher share no decoder stage of equal spatial size")
    s, t = pairs[-1]
    return Adapter(s.shape[1], t.shape[1], s.dim() - 2)


def distillation_resolutions() -> dict[str, str]:
    """Where each term compares a (possibly half-resolution) student with the teacher."""
    full = "input resolution (student embedding upsampled to the input size, as decoded)"
    return {
        "affinity": full,
        "node": full,
        "edge": full,
        "inter_affinity": full + "; memory crops at their own resolution, both sides 7x7 average-pooled",
        "inter_node": full,
        "inter_edge": full,
        "mimic": full,
        "at": "every decoder stage the student shares with the teacher by spatial size",
        "skd": "the highest-resolution decoder stage shared by student and teacher",
        "cwd": "the highest-resolution decoder stage shared by student and teacher, student via an Adapter",
    }


def _as_labels(labels: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """Instance labels as a long tensor on ``device`` (numpy uint16/int32 maps accepted)."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return labels.to(device=device, dtype=torch.long)


class DistillationObjective:
    """Weighted sum of the active distillation terms; inter-image terms read (then feed) a memory bank.

    Works on images (B,C,H,W) and volumes (B,C,D,H,W); ``offsets`` are the affinity offsets of
    intra AGD (None: the defaults of the embedding's dimensionality; pass a 3D model's own).
    Terms with weight 0 are not computed. When an inter-image term is on and no ``memory_bank`` is
    given, a default :class:`MemoryBank` is created (its ``pool`` sets the inter-AGD pooling). The bank is sampled without the current
    batch's image ids, and pushed with the current teacher embeddings only after the inter terms
    are computed, so the first batch has no inter terms. ``adapter`` (student→teacher channels
    for CWD, see :func:`make_adapter`) must be optimised with the student. ``share`` maps this
    process' (teacher embeddings, labels, image ids) to those of the whole global batch when
    training runs over several processes (``train.distributed.gather_items``), so that every
    process excludes and pushes the same items and holds the same bank.
    """

    def __init__(
        self,
        weights: DistillWeights,
        memory_bank: MemoryBank | None = None,
        *,
        adapter: Adapter | None = None,
        skd_pool: int = 16,
        cwd_tau: float = 4.0,
        generator: torch.Generator | None = None,
        share: Callable[[torch.Tensor, torch.Tensor, Sequence[Hashable]], tuple] | None = None,
        offsets: Offsets | None = None,
    ):
        self.weights = weights
        self.share = share
        self.offsets = offsets
        self.uses_memory = any(getattr(weights, k) > 0 for k in INTER_TERMS)
        if memory_bank is None and self.uses_memory:
            memory_bank = MemoryBank()
        self.memory_bank = memory_bank
        self.adapter = adapter
        self.skd_pool = skd_pool
        self.cwd_tau = cwd_tau
        self.generator = generator

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Memory bank and sampling generator as tensors + JSON, so a resumed run continues exactly."""
        tensors, meta = self.memory_bank.get_state() if self.memory_bank is not None else ({}, {})
        tensors = {f"memory.{k}": v for k, v in tensors.items()}
        if self.generator is not None:
            tensors["generator"] = self.generator.get_state()
        return tensors, {"memory": meta}

    def set_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of :meth:`get_state`."""
        if self.memory_bank is not None:
            self.memory_bank.set_state({k[7:]: v for k, v in tensors.items() if k.startswith("memory.")}, meta["memory"])
        if self.generator is not None:
            self.generator.set_state(tensors["generator"])

    @property
    def needs_features(self) -> bool:
        """Whether ``NetOut.features`` must be filled (a feature-level baseline is on)."""
        return any(getattr(self.weights, k) > 0 for k in FEATURE_TERMS)

    def __call__(
        self,
        student_out: NetOut,
        teacher_out: NetOut,
        labels: torch.Tensor | np.ndarray,
        image_ids: Sequence[Hashable],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total weighted loss and the unweighted value of every computed term (``parts``).

        Computed in float32 even under autocast: bf16 cosines (8-bit mantissa) would quantise the
        small student-teacher differences being distilled.
        """
        with torch.autocast(student_out.embedding.device.type, enabled=False):
            return self._compute(student_out, teacher_out, labels, image_ids)

    def _compute(
        self,
        student_out: NetOut,
        teacher_out: NetOut,
        labels: torch.Tensor | np.ndarray,
        image_ids: Sequence[Hashable],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Body of :meth:`__call__`, outside autocast."""
        w = self.weights
        emb_s = student_out.embedding.float()
        emb_t = teacher_out.embedding.detach().float()
        labels = _as_labels(labels, emb_s.device)
        terms: dict[str, torch.Tensor] = {}
        if w.affinity > 0:
            terms["affinity"] = agd_loss(emb_t, emb_s, self.offsets, affinities_s=student_out.affinities)
        if w.node > 0 or w.edge > 0 or w.inter_node > 0 or w.inter_edge > 0:
            nodes_t, nodes_s = batch_nodes(emb_t, labels), batch_nodes(emb_s, labels)
            if w.node > 0 or w.edge > 0:
                terms["node"], terms["edge"] = graph_losses(nodes_t, nodes_s)
        if self.uses_memory:
            bank_items = self.share(emb_t, labels, image_ids) if self.share is not None else (emb_t, labels, image_ids)
            items = self.memory_bank.sample(exclude_ids=bank_items[2], generator=self.generator)
            if items:
                if w.inter_node > 0 or w.inter_edge > 0:
                    terms["inter_node"], terms["inter_edge"] = inter_igd_loss(nodes_t, nodes_s, [m.nodes for m in items])
                if w.inter_affinity > 0:
                    terms["inter_affinity"] = inter_agd_loss([m.gram for m in items], emb_t, emb_s, self.memory_bank.pool)
        if w.mimic > 0:
            terms["mimic"] = mimic_loss(emb_s, emb_t)
        if self.needs_features:
            terms.update(self._feature_terms(student_out.features, teacher_out.features))
        if self.uses_memory:
            self.memory_bank.push(*bank_items)
        terms = {k: v for k, v in terms.items() if getattr(w, k) > 0}  # node/edge come in pairs
        total = sum((getattr(w, k) * v for k, v in terms.items()), emb_s.sum() * 0)
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def _feature_terms(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """AT over all shared stages; SKD and CWD on the highest-resolution shared stage."""
        w = self.weights
        pairs = [(s.float(), t.detach().float()) for s, t in match_stages(student_feats, teacher_feats)]
        if not pairs:
            raise ValueError("feature baselines need student and teacher decoder stages of equal spatial size")
        s_last, t_last = pairs[-1]
        terms: dict[str, torch.Tensor] = {}
        if w.at > 0:
            terms["at"] = torch.stack([attention_transfer_loss(s, t) for s, t in pairs]).sum()
        if w.skd > 0:
            terms["skd"] = skd_pairwise_loss(s_last, t_last, self.skd_pool)
        if w.cwd > 0:
            s_proj = self.adapter(s_last) if self.adapter is not None else s_last
            terms["cwd"] = cwd_loss(s_proj, t_last, self.cwd_tau)
        return terms
