"""Data-parallel training over ``torch.distributed`` processes (gloo, CPU), started by ``torchrun`` (docs/method.md, "Distributed training").

A run launched by ``torchrun`` (its ``WORLD_SIZE``/``RANK`` environment variables, world size > 1)
joins one gloo process group; without them, or with one process, every helper here is the
identity and training is the one-process loop. With W processes:

* every rank draws the same global batch from the step's seeded generator and keeps its
  contiguous 1/W share (:func:`shard`), so the W shares together are the one-process batch;
* BatchNorm layers normalise with the statistics of the global batch (:class:`SyncBatchNorm`;
  torch's own ``SyncBatchNorm`` refuses CPU tensors);
* the network (and extra modules) run under ``DistributedDataParallel``, which averages the
  gradients, so every rank takes the same optimiser step;
* the distillation memory bank receives every rank's items (:func:`gather_items`), so all ranks
  hold the bank one process would hold;
* rank 0 alone validates, writes checkpoints and the run state; the others wait for it.
"""
from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

BACKEND = "gloo"
TIMEOUT = timedelta(hours=2)  # ranks wait this long at a collective (rank 0 may be validating)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or an equivalent launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def threads_per_process() -> int:
    """Torch threads for each of this machine's training processes: its idle CPUs shared equally (0 when not launched)."""
    if not launched():
        return 0
    from ..runtime import default_threads

    return max(1, default_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup() -> None:
    """Join the launcher's process group (gloo) once; nothing for a one-process run."""
    if launched() and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(BACKEND, timeout=TIMEOUT)


def active() -> bool:
    """Whether training runs over more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of training processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process' rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes files and validates (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank arrives (nothing for one process)."""
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (the end of a ``torchrun`` command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch_size(batch_size: int) -> None:
    """Refuse a global batch that the processes cannot share equally."""
    if batch_size % world_size():
        raise ValueError(f"the batch size ({batch_size}) must be a multiple of the number of processes ({world_size()})")


def shard(batch: Any) -> Any:
    """This rank's contiguous share of a global batch (the whole batch for one process).

    A batch is a tuple, list or dataclass of arrays/tensors whose first axis is the batch item,
    or of lists of per-item ids (strings or numbers); lists of arrays (e.g. feature levels) are
    sharded element-wise.
    """
    if not active():
        return batch
    return _take(batch, rank(), world_size())


def _take(value: Any, r: int, w: int) -> Any:
    """Item slice ``r`` of ``w`` of every leaf of ``value``."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        n = len(value) // w
        return value[r * n : (r + 1) * n]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _take(getattr(value, f.name), r, w) for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (str, int, float)) for v in value):
            n = len(value) // w
            return type(value)(value[r * n : (r + 1) * n])
        return type(value)(_take(v, r, w) for v in value)
    return value


def split_work(fn: Callable[[list], list], items: list) -> list:
    """``fn(items)`` with the items dealt to the ranks in turn and every result sent to every rank.

    ``fn`` must map each item on its own (e.g. the teacher's outputs per training image), so the
    result is the one-process result; results travel one at a time, so no rank holds two copies.
    """
    if not active():
        return fn(items)
    r, w = rank(), world_size()
    mine = fn(items[r::w])
    results = []
    for i in range(len(items)):
        box = [mine[i // w] if i % w == r else None]
        dist.broadcast_object_list(box, src=i % w)
        results.append(box[0])
    return results


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a stop request reaches all ranks together)."""
    if not active():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. its validation scores)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(record: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks that report it: a step's losses of the global batch, as one process logs them."""
    if not active():
        return record
    records: list[Any] = [None] * world_size()
    dist.all_gather_object(records, record)
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}


def same_on_all_ranks(value: Any) -> bool:
    """Whether every rank holds the same (picklable) ``value``, e.g. the step of the run state each one loaded."""
    if not active():
        return True
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def gather_items(embeddings: torch.Tensor, labels: torch.Tensor, image_ids: Sequence) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Every rank's batch items in global batch order (rank 0's first): the memory bank sees the global batch."""
    if not active():
        return embeddings, labels, list(image_ids)
    w = world_size()
    embs = [torch.empty_like(embeddings) for _ in range(w)]
    labs = [torch.empty_like(labels) for _ in range(w)]
    ids: list[Any] = [None] * w
    dist.all_gather(embs, embeddings.detach().contiguous())
    dist.all_gather(labs, labels.contiguous())
    dist.all_gather_object(ids, list(image_ids))
    return torch.cat(embs), torch.cat(labs), [i for part in ids for i in part]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: each rank's input gets the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks, on CPU (gloo).

    Outside training or a process group it is the plain BatchNorm it replaced (same state dict).
    The mean and the variance are all-reduced in two passes (sum, then centred squares), with
    gradients through both, so W ranks compute what one BatchNorm computes on the concatenated batch.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        total = torch.tensor(x.numel() // x.shape[1])
        dist.all_reduce(total)
        count = int(total)
        mean = _SumOverRanks.apply(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm layer of ``module`` (in place) by a :class:`SyncBatchNorm` sharing its parameters and buffers."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


class _Step(torch.nn.Module):
    """The network and extra modules behind one step's loss, as one module for ``DistributedDataParallel``."""

    def __init__(self, model: torch.nn.Module, extra_modules: Sequence[torch.nn.Module], step_loss: Callable):
        super().__init__()
        self.model = model
        self.extra = torch.nn.ModuleList(extra_modules)
        self.step_loss = step_loss

    def forward(self, batch: Any) -> Any:
        return self.step_loss(self.model, batch)


def parallel_step(model: torch.nn.Module, extra_modules: Sequence[torch.nn.Module],
                  step_loss: Callable[[torch.nn.Module, Any], Any]) -> Callable[[Any], Any]:
    """``batch -> step_loss(model, batch)``; over several ranks with synchronised BatchNorm and averaged gradients.

    Call it after the model's state is loaded: ``DistributedDataParallel`` starts every rank from rank 0's weights.
    """
    if not active():
        return lambda batch: step_loss(model, batch)
    convert_sync_batchnorm(model)
    for extra in extra_modules:
        convert_sync_batchnorm(extra)
    # static_graph: the same parameters take part in every step (a head without a loss term never does)
    return torch.nn.parallel.DistributedDataParallel(_Step(model, extra_modules, step_loss), static_graph=True)
