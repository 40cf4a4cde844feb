"""Training and distillation over 2 processes (gloo, CPU) equal one process with the same global batch, and resume.

The two processes are started as ``torchrun`` would start them (its environment variables), so
the code under test detects them as the CLI does. Fully annotated crops that each hold an
instance make every loss term an equal-weight mean over batch items, the setting in which
W processes compute the one-process gradient exactly (docs/method.md, "Distributed training").
"""
import json
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from napari_graphkd.data import AugmentConfig, Sample
from napari_graphkd.distill import method_weights
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.train import distributed
from napari_graphkd.train.distill import DistillSettings, distill_samples
from napari_graphkd.train.loop import TrainSettings, run_training, segmentation_batches, segmentation_loss

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")

STEPS = 4
WORLD = 2
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32 sums in another order; observed max difference ~1e-6


def grid_samples(n: int = 3, size: int = 48) -> list[Sample]:
    """Noisy images tiled with 8x8 squares every 12 px: any 32 px crop is fully annotated and holds instances."""
    rng = np.random.default_rng(7)
    samples = []
    for i in range(n):
        image = 0.1 * rng.random((size, size), dtype=np.float32)
        labels = np.zeros((size, size), dtype=np.int32)
        for k, (y, x) in enumerate(((y, x) for y in range(2, size, 12) for x in range(2, size, 12)), start=1):
            labels[y : y + 8, x : x + 8] = k
            image[y : y + 8, x : x + 8] += 0.5 + 0.1 * ((k + i) % 4)
        samples.append(Sample(f"img{i}", image, labels))
    return samples


def settings() -> TrainSettings:
    augment = AugmentConfig(crop=32, scale_range=None, blur_prob=0.0)
    return TrainSettings(steps=STEPS, batch_size=4, lr=3e-3, warmup=1, save_every=2, snapshot_every=STEPS,
                         validate_every=2, bf16=False, augment=augment)


def tiny_model(seed: int = 0):
    """A tiny network whose convolution biases right before a BatchNorm are frozen.

    BatchNorm cancels such a bias, so its gradient is zero up to rounding, and AdamW turns that
    rounding noise into full-size steps in any run; frozen, they leave a comparison of the rest exact.
    """
    torch.manual_seed(seed)
    model = build_model(UNetConfig(widths=(4, 8)))
    for seq in (m for m in model.modules() if isinstance(m, torch.nn.Sequential)):
        for conv, norm in zip(seq, list(seq)[1:]):
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d) and conv.bias is not None:
                conv.bias.requires_grad_(False)
    return model


def seg_step(net, batch):
    images, labels = batch
    emb, fg = net(torch.from_numpy(images))
    return segmentation_loss(emb, fg, labels, 1.0)


def train(run_dir, calls: list) -> dict:
    """Segmentation training; ``calls`` records the ranks that validated."""
    def validate(model):
        calls.append(distributed.rank())
        return {"score": float(sum(b.sum() for b in model.buffers()))}  # BatchNorm statistics

    return run_training(tiny_model(), segmentation_batches(grid_samples(), settings()), run_dir, settings(),
                        step_loss=seg_step, metadata={}, validate=validate)


def distill(run_dir, stop_after: int | None = None) -> dict:
    """GRD distillation (memory bank included) of a tiny student; optionally stopped after ``stop_after`` steps."""
    calls = iter(range(10**6))
    method = DistillSettings(method="grd", weights=method_weights("grd"), memory_size=4, memory_samples=2)
    return distill_samples(tiny_model(1).eval(), tiny_model(2), grid_samples(), run_dir, settings(), method, metadata={},
                           should_stop=lambda: stop_after is not None and next(calls) >= stop_after)


def worker(rank: int, port: int, out: str) -> None:
    """One of the processes: the environment torchrun gives, then every scenario, then per-rank facts as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    calls: list[int] = []
    progress = train(os.path.join(out, "train"), calls)
    distill(os.path.join(out, "distill"))
    stopped = distill(os.path.join(out, "resumed"), stop_after=2)
    resumed = distill(os.path.join(out, "resumed"))
    facts = {"validated_on": calls, "validation": progress["validation"], "stopped_at": stopped["step"],
             "resumed_history": len(resumed["history"])}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_tensors(run_dir) -> dict[str, torch.Tensor]:
    """The network's weights and BatchNorm statistics in a run's state."""
    return {k: v for k, v in load_file(str(run_dir / "state.safetensors")).items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same runs with one process (here) and with two (spawned, as torchrun would)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    ctx = mp.start_processes(worker, args=(free_port(), str(two)), nprocs=WORLD, join=False, start_method="spawn")
    train(one / "train", [])  # while the two processes start
    distill(one / "distill")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two training processes did not finish within 120 s")
    torch.set_num_threads(threads)
    facts = [json.loads((two / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return one, two, facts


@pytest.mark.parametrize("run", ["train", "distill"])
def test_two_processes_equal_one_process_with_the_same_global_batch(runs, run):
    one, two, _ = runs
    single, double = model_tensors(one / run), model_tensors(two / run)
    assert single.keys() == double.keys()
    for name, value in single.items():
        torch.testing.assert_close(double[name], value, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    logged = [json.loads((d / run / "progress.json").read_text())["history"] for d in (one, two)]
    assert [r.keys() for r in logged[0]] == [r.keys() for r in logged[1]]
    for a, b in zip(*logged):  # rank 0 logs the global batch's losses
        assert list(b.values()) == pytest.approx(list(a.values()), rel=1e-4, abs=1e-6)
    initial = tiny_model(0 if run == "train" else 2).state_dict()
    moved = max(float((value - initial[name[6:]]).abs().max()) for name, value in single.items() if value.is_floating_point())
    assert moved > 1e-3  # the runs trained: equality is not that of two untouched models


def test_rank_zero_alone_validates_and_every_rank_gets_its_scores(runs):
    _, two, facts = runs
    assert facts[0]["validated_on"] == [0, 0] and facts[1]["validated_on"] == []
    assert facts[0]["validation"] == facts[1]["validation"] and len(facts[0]["validation"]) == 2
    assert json.loads((two / "train" / "progress.json").read_text())["step"] == STEPS


def test_two_process_distillation_resumes_exactly(runs):
    """Stopped after 2 steps and resumed (memory bank and sampler from the state) equals the uninterrupted run."""
    _, two, facts = runs
    assert all(f["stopped_at"] == 2 and f["resumed_history"] == STEPS for f in facts)
    uninterrupted, resumed = model_tensors(two / "distill"), model_tensors(two / "resumed")
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    bank = {k: v for k, v in load_file(str(two / "distill" / "state.safetensors")).items() if k.startswith("state0.memory.")}
    again = load_file(str(two / "resumed" / "state.safetensors"))
    assert bank and all(torch.equal(again[k], v) for k, v in bank.items())


def test_batch_that_processes_cannot_share_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        distributed.check_batch_size(4)


def test_sync_batchnorm_conversion_keeps_parameters_state_and_one_process_output():
    """Converted layers share the original tensors, and without a process group they compute plain BatchNorm."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 32, 32)
    want = model(x)[0]
    weights = [id(p) for p in model.parameters()]
    model.load_state_dict(before)  # undo the running statistics the forward pass updated
    distributed.convert_sync_batchnorm(model)
    assert any(isinstance(m, distributed.SyncBatchNorm) for m in model.modules())
    assert [id(p) for p in model.parameters()] == weights and model.state_dict().keys() == before.keys()
    torch.testing.assert_close(model(x)[0], want, rtol=0, atol=0)


def test_processes_of_one_machine_share_its_idle_cpus(monkeypatch):
    from napari_graphkd import runtime

    monkeypatch.setattr(runtime, "default_threads", lambda: 8)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.threads_per_process() == 0  # not launched: the caller's default
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.threads_per_process() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert distributed.threads_per_process() == 1
