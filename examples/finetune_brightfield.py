"""Fine-tune on a new modality (bright-field, dark nuclei) from a few annotated crops.

The bundled models learnt bright-field nuclei from 6 whole images of this set; the crops here
come from 8 others, which no bundled model trained on. This script fine-tunes the models with
the library's default mode (fine-tune the teacher, then re-distil the student) on four annotated
bright-field crops (the last of them is held out by the library to report held-out scores) and then scores the
classical pipeline and the models before and after on four crops of OTHER images of the same set,
which the fine-tuning never saw. The crops ship in ``examples/data/brightfield/``
(Kaggle DSB 2018, CC0; see the README there).

    python examples/finetune_brightfield.py                       # bundled models, default mode and steps
    python examples/finetune_brightfield.py --teacher t.safetensors --student s.safetensors
    python examples/finetune_brightfield.py --mode finetune       # fine-tune the student only
    python examples/finetune_brightfield.py --seed 1              # another seed (crops, augmentation)
    python examples/finetune_brightfield.py --data DIR            # other crops: DIR/{train,test}/{images,labels}

New checkpoints go to a fresh temporary folder unless ``--out`` is given; nothing is overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_graphkd.io.checkpoint import CheckpointError
from napari_graphkd.metrics import evaluate, mean_metrics
from napari_graphkd.runtime import configure_threads
from napari_graphkd.segment import BUNDLED, bundled_path, load_segmenter, segment_any
from napari_graphkd.train.finetune import (MODES, AnnotatedImage, FinetunePlan, FinetuneResult, FinetuneSettings,
                                          finetune_report, plan_finetune, run_finetune)

DATA = Path(__file__).parent / "data" / "brightfield"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from provenance import header  # noqa: E402  (version, commit and command line of this run)
SCORES = ("f1@0.5", "aji", "pq")
COLUMNS = (*SCORES, "n_pred", "n_gt")


def load_split(data: Path, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, labels) of every crop of ``data/train`` or ``data/test``."""
    folder = data / split
    return [(p.stem, tifffile.imread(p), tifffile.imread(folder / "labels" / p.name).astype(np.int32))
            for p in sorted((folder / "images").glob("*.tif"))]


def training_crops(data: Path) -> list[AnnotatedImage]:
    """The crops of ``data/train`` as annotated images, every one fully checked (the library holds the last one back)."""
    return [AnnotatedImage(name, image, labels, np.ones(labels.shape, bool)) for name, image, labels in load_split(data, "train")]


def run_timed(plan: FinetunePlan, out: Path, on_progress: Callable[[dict], None] = lambda record: None
              ) -> tuple[FinetuneResult, float, float]:
    """``run_finetune`` of the plan (new checkpoints in ``out``), with its wall-clock and CPU seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    result = run_finetune(plan, out, on_progress=on_progress)
    return result, time.perf_counter() - started, time.process_time() - cpu


def score(spec: str, crops: list, diameter: float) -> dict[str, float]:
    """Per-crop mean metrics of a model run as the Segment widget runs it (diameter, inverted input)."""
    segmenter = load_segmenter(spec)
    return mean_metrics([evaluate(labels, segment_any(segmenter, image, diameter=diameter, invert=True, channel="luminance").labels)
                         for _, image, labels in crops])


def describe_steps(settings: FinetuneSettings) -> str:
    """How many steps each network trains."""
    student = f"{settings.steps} student steps"
    return f"{settings.teacher_steps} teacher + {student}" if settings.mode == "teacher" else student


def table(rows: dict[str, dict[str, float]]) -> str:
    """Fixed-width table of mean metrics."""
    lines = [f"{'model (test crops of other images)':<46}" + "".join(f"{c:>9}" for c in COLUMNS)]
    for name, m in rows.items():
        lines.append(f"{name:<46}" + "".join(f"{m[c]:>9.3f}" if c in SCORES else f"{m[c]:>9.1f}" for c in COLUMNS))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="teacher checkpoint or bundled name (default: the bundled teacher)")
    p.add_argument("--student", default=None, help="student checkpoint (default: the bundled student)")
    p.add_argument("--data", type=Path, default=DATA, help="folder with train/ and test/ (default: the shipped crops)")
    p.add_argument("--mode", default=FinetuneSettings.mode, choices=list(MODES))
    p.add_argument("--steps", type=int, default=FinetuneSettings.steps, help="student steps")
    p.add_argument("--teacher-steps", type=int, default=FinetuneSettings.teacher_steps, help="teacher steps (mode teacher)")
    p.add_argument("--seed", type=int, default=FinetuneSettings.seed, help="random seed of the fine-tuning (crops, augmentation)")
    p.add_argument("--out", default=None, help="folder for the new checkpoints (default: a new temporary folder)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: one per idle CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Fine-tune, then print held-out and other-image scores before and after."""
    args = parse_args(argv)
    configure_threads(args.threads)
    teacher, student = (bundled_path(name) if name in BUNDLED else Path(name)
                        for name in (args.teacher or "teacher", args.student or "student"))
    for role, path in (("teacher", teacher), ("student", student)):
        if not path.is_file():
            print(f"no {role} checkpoint at {path}: the bundled weights are not installed yet; "
                  f"pass --{role} PATH to a napari-graphkd checkpoint", file=sys.stderr)
            return 2
    start = time.perf_counter()
    print(header() + "\n")
    train, test = training_crops(args.data), load_split(args.data, "test")
    try:
        settings = FinetuneSettings(mode=args.mode, steps=args.steps, teacher_steps=args.teacher_steps,
                                    seed=args.seed)
        plan = plan_finetune(train, settings, teacher, student)
    except (CheckpointError, ValueError) as exc:
        print(f"cannot fine-tune: {exc}", file=sys.stderr)
        return 2
    print(f"{len(train)} annotated crops (fully checked), nuclei of "
          f"{plan.diameter:.1f} px -> {plan.train_diameter:.1f} px; mode '{args.mode}', {describe_steps(settings)}, "
          f"seed {args.seed}, on {torch.get_num_threads()} thread(s)", flush=True)
    rows = {"classical": score("classical", test, plan.diameter),
            f"teacher {teacher.name}": score(str(teacher), test, plan.diameter),
            f"student before ({student.name})": score(str(student), test, plan.diameter)}
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="graphkd-brightfield-"))

    def on_progress(record: dict) -> None:
        if record["loss"] is not None and (record["done"] % 25 == 0 or record["done"] == record["total"]):
            print(f"  {record['phase']} {record['done']}/{record['total']}: loss {record['loss']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    result, finetune_seconds, cpu = run_timed(plan, out, on_progress)
    for role, path in result.saved.items():
        rows[f"{role} after ({path.name})"] = score(str(path), test, plan.diameter)
    print(finetune_report(result, plan))
    print()
    print(table(rows))
    print(f"\nfine-tuning (run_finetune): {finetune_seconds:.0f} s ({cpu:.0f} CPU s); with the scoring above "
          f"{time.perf_counter() - start:.0f} s; {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
