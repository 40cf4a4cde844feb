"""FIFO memory bank of teacher embeddings for inter-image distillation (docs/method.md, "Distillation")."""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .igd import instance_nodes
from .inter import pooled_gram


@dataclass(frozen=True)
class MemoryItem:
    """One past training crop: teacher embedding, instance labels, teacher instance nodes, image id."""

    embedding: torch.Tensor  # (C,*spatial) float16, raw teacher embedding at the crop's resolution (2D or 3D)
    labels: torch.Tensor  # (*spatial) int32 instance labels, background 0
    nodes: torch.Tensor  # (N,C) float32 teacher instance nodes, computed at push time
    gram: torch.Tensor  # (C,C) float32 pooled second moments for inter-image AGD, computed at push time
    image_id: Hashable


class MemoryBank:
    """FIFO of ``size`` teacher crops; ``sample`` never returns a crop of an excluded (current) image."""

    def __init__(self, size: int = 32, sample_count: int = 12, pool: int = 7):
        if size < 1 or sample_count < 1 or pool < 1:
            raise ValueError("size, sample_count and pool must be >= 1")
        self.size = size
        self.sample_count = sample_count
        self.pool = pool
        self._items: deque[MemoryItem] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Drop every stored item."""
        self._items.clear()

    def items(self) -> list[MemoryItem]:
        """Stored items, oldest first."""
        return list(self._items)

    def push(self, embeddings: torch.Tensor, labels: torch.Tensor, image_ids: Sequence[Hashable]) -> None:
        """Store detached teacher embeddings (B,C,*spatial) with labels (B,*spatial); the oldest items leave first."""
        if not (len(embeddings) == len(labels) == len(image_ids)):
            raise ValueError("embeddings, labels and image_ids must have the same length")
        for emb, lab, image_id in zip(embeddings.detach(), labels, image_ids):
            nodes = instance_nodes(emb.float(), lab)
            gram = pooled_gram(emb.float(), self.pool)
            self._items.append(MemoryItem(emb.to(torch.float16), lab.to(torch.int32), nodes, gram, image_id))

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Stored items as named tensors plus their image ids (JSON), for an exact training resume."""
        tensors = {}
        for i, item in enumerate(self._items):
            for field in ("embedding", "labels", "nodes", "gram"):
                tensors[f"{i}.{field}"] = getattr(item, field).clone()  # items may share storage with a batch
        return tensors, {"image_ids": [item.image_id for item in self._items]}

    def set_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of :meth:`get_state`: replace the stored items."""
        self._items.clear()
        for i, image_id in enumerate(meta["image_ids"]):
            self._items.append(MemoryItem(*(tensors[f"{i}.{f}"] for f in ("embedding", "labels", "nodes", "gram")), image_id))

    def sample(
        self,
        k: int | None = None,
        exclude_ids: Iterable[Hashable] = (),
        generator: torch.Generator | None = None,
    ) -> list[MemoryItem]:
        """Up to ``k`` (default ``sample_count``) distinct random items whose image id is not excluded."""
        k = self.sample_count if k is None else k
        excluded = set(exclude_ids)
        eligible = [item for item in self._items if item.image_id not in excluded]
        order = torch.randperm(len(eligible), generator=generator)[:k]
        return [eligible[i] for i in order.tolist()]
