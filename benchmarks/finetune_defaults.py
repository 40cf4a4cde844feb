"""Which fine-tuning defaults? Settings -> held-back and test F1 of teacher and student, and seconds.

Each row runs the library's fine-tuning (``plan_finetune`` + ``run_finetune``, as the Fine-tune
widget and ``graphkd finetune`` do) on the bright-field example's four training crops (every crop
fully checked; the library holds the last one back) with the bundled teacher and student, then
scores the new models, run as the Segment widget runs them (measured diameter, inverted input,
their re-tuned decoder), on the held-back crop (its 8 cells: this column chooses the defaults) and
on the example's four test crops of other images (reported, never used to choose). Every row
differs from the defaults (``FinetuneSettings()``) only in the settings it names; ``seconds`` is the
whole ``run_finetune`` call (scoring before, training, re-tuning, scoring after, saving).

    python benchmarks/finetune_defaults.py                  # every row (about an hour on 2 busy cores)
    python benchmarks/finetune_defaults.py --only default t75 --threads 1
    python benchmarks/finetune_defaults.py --report         # the table from the cached rows

Finished rows are cached as JSON under ``--results`` (one file per row), so rows may run in
several processes at once (``--only`` with disjoint names); their scores do not depend on the
load, their seconds do (each row records its thread count and the machine's load average).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from provenance import REPO, command_line, header, write_row

from napari_graphkd.metrics import evaluate, mean_metrics
from napari_graphkd.segment import bundled_path, load_segmenter, segment_any
from napari_graphkd.train.finetune import AnnotatedImage, FinetuneSettings, plan_finetune, run_finetune

sys.path.insert(0, str(REPO / "examples"))
from finetune_brightfield import DATA, load_split, training_crops  # noqa: E402  (the example's crops)

RESULTS = REPO / "benchmarks" / "results" / "finetune_rows"
# Row name -> settings that differ from FinetuneSettings() (the defaults).
ROWS: dict[str, dict] = {
    "default": {},
    "seed 1": {"seed": 1},
    "seed 2": {"seed": 2},
    "teacher 75 steps": {"teacher_steps": 75},
    "teacher 300 steps": {"teacher_steps": 300},
    "teacher decoder only": {"teacher_layers": "decoder"},
    "teacher lr 3e-3": {"teacher_lr": 3e-3},
    "teacher scale augmentation": {"scale_augment": True},
    "student lr 3e-3": {"lr": 3e-3},
    "student 150 steps (default teacher)": {"teacher_from": "default", "mode": "finetune", "steps": 150},
    "student 600 steps (default teacher)": {"teacher_from": "default", "mode": "finetune", "steps": 600},
    "student lr 3e-3 (default teacher)": {"teacher_from": "default", "mode": "finetune", "lr": 3e-3},
    "student crop 256 (default teacher)": {"teacher_from": "default", "mode": "finetune", "crop": 256},
    "mode finetune (student only)": {"mode": "finetune"},
    "previous default: finetune, 300 steps, crop 256": {"mode": "finetune", "crop": 256},
    "previous teacher mode: 300 + 300 steps, crop 256": {"teacher_steps": 300, "crop": 256},
}
SCORES = ("f1@0.5", "aji")


def key(name: str) -> str:
    """File name of a row's cached result."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def score(spec: str, crops: list, diameter: float) -> dict[str, float]:
    """Mean per-crop metrics of a model (or ``classical``) run as the Segment widget runs it."""
    segmenter = load_segmenter(spec)
    return mean_metrics([evaluate(labels, segment_any(segmenter, image, diameter=diameter, invert=True,
                                                      channel="luminance").labels) for _, image, labels in crops])


def training_images() -> list[AnnotatedImage]:
    """The example's training crops, every one fully checked (the library holds the last one back)."""
    return training_crops(DATA)


def baseline(diameter: float) -> dict:
    """Classical, teacher and student before fine-tuning on the held-back and test crops."""
    held, test = load_split(DATA, "train")[-1:], load_split(DATA, "test")
    specs = {"classical": "classical", "teacher": str(bundled_path("teacher")), "student": str(bundled_path("student"))}
    return {role: {"held": score(spec, held, diameter), "test": score(spec, test, diameter)} for role, spec in specs.items()}


def run_row(name: str, threads: int, runs: Path) -> dict:
    """Fine-tune with the row's settings; scores of the new models and the time it took.

    A row with ``teacher_from`` trains the student only (mode ``finetune``: annotation + graph
    distillation, the student phase of mode ``teacher``) from the fine-tuned teacher that row saved.
    """
    spec = dict(ROWS[name])
    source = spec.pop("teacher_from", None)
    teacher = runs / key(source) / "teacher-finetuned.safetensors" if source else bundled_path("teacher")
    if not teacher.is_file():
        raise FileNotFoundError(f"row {name!r} needs the teacher of row {source!r}: run that row first")
    settings = replace(FinetuneSettings(invert=True), **spec)
    plan = plan_finetune(training_images(), settings, teacher, bundled_path("student"))
    held, test = load_split(DATA, "train")[-1:], load_split(DATA, "test")
    phases: dict[str, float] = {}
    last = [time.perf_counter()]

    def on_progress(record: dict) -> None:
        now = time.perf_counter()
        phases[record["phase"]] = phases.get(record["phase"], 0.0) + now - last[0]
        last[0] = now

    folder = runs / key(name)
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted run of this row
    start, cpu = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0]
    result = run_finetune(plan, folder, on_progress=on_progress)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    scores = {role: {"held": score(str(path), held, plan.diameter), "test": score(str(path), test, plan.diameter)}
              for role, path in result.saved.items()}
    return {"name": name, "teacher_from": source, "settings": asdict(settings), "scores": scores, "seconds": seconds,
            "cpu_seconds": cpu, "threads": threads, "load_before": load, "load_after": os.getloadavg()[0], "phases": phases,
            "diameter": plan.diameter}


def cell(row: dict, role: str, split: str) -> str:
    """'F1 / AJI' of one role on one split, or blank."""
    s = row["scores"].get(role, {}).get(split)
    return f"{s['f1@0.5']:.3f} / {s['aji']:.3f}" if s else ""


def table(rows: list[dict], base: dict | None) -> str:
    """Markdown table: held-back and test scores of teacher and student, seconds, threads."""
    lines = ["| settings (differences from the defaults) | held-back teacher | held-back student | test teacher "
             "| test student | seconds | CPU s | threads | load |", "|---|---|---|---|---|---|---|---|---|"]
    if base:
        for role in ("classical", "teacher", "student"):
            fake = {"scores": {role: base[role]}}
            label = role if role == "classical" else f"{role} before fine-tuning"
            t, s = ("teacher", "student") if role != "classical" else ("classical", "classical")
            lines.append(f"| {label} | {cell(fake, t, 'held') if role != 'student' else ''} | "
                         f"{cell(fake, s, 'held') if role != 'teacher' else ''} | "
                         f"{cell(fake, t, 'test') if role != 'student' else ''} | "
                         f"{cell(fake, s, 'test') if role != 'teacher' else ''} | | | | |")
    for r in rows:
        lines.append(f"| {r['name']} | {cell(r, 'teacher', 'held')} | {cell(r, 'student', 'held')} | "
                     f"{cell(r, 'teacher', 'test')} | {cell(r, 'student', 'test')} | {r['seconds']:.0f} | "
                     f"{r.get('cpu_seconds', float('nan')):.0f} | {r['threads']} | {r['load_before']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=None, metavar="ROW", help=f"rows to run (default: all): {', '.join(ROWS)}")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the cached rows")
    p.add_argument("--runs", type=Path, default=Path("runs/finetune_defaults"),
                   help="folder for each row's new checkpoints (default runs/finetune_defaults)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--report", action="store_true", help="print the table from the cached rows only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the missing rows, then print the table of every cached row."""
    args = parse_args(argv)
    unknown = [n for n in args.only or [] if n not in ROWS]
    if unknown:
        print(f"unknown rows: {unknown}; known: {list(ROWS)}", file=sys.stderr)
        return 2
    for role in ("teacher", "student"):
        if not bundled_path(role).is_file():
            print(f"no bundled {role} checkpoint at {bundled_path(role)}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    print(header() + "\n", flush=True)
    base_file = args.results / "baseline.json"
    if not args.report:
        if not base_file.exists():
            plan = plan_finetune(training_images(), FinetuneSettings(invert=True), bundled_path("teacher"), bundled_path("student"))
            write_row(base_file, baseline(plan.diameter))
        for name in args.only or ROWS:
            path = args.results / f"{key(name)}.json"
            if path.exists():
                continue
            row = dict(run_row(name, args.threads, args.runs), command=command_line())
            write_row(path, row)
            print(f"{name}: {row['seconds']:.0f} s, student test {cell(row, 'student', 'test')}", flush=True)
    rows = [json.loads((args.results / f"{key(n)}.json").read_text()) for n in ROWS if (args.results / f"{key(n)}.json").exists()]
    base = json.loads(base_file.read_text()) if base_file.exists() else None
    print(f"defaults: {asdict(FinetuneSettings())}\n")
    print(table(rows, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
