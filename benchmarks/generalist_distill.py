"""Does distillation earn its place on the generalist pair? Students with a few labelled images and many without labels.

The user modelled: a quarter of the training images (per source, a seeded random choice from the
bundled train lists of BBBC039 and the DSB2018 fluorescence split) have labels; the other training
images are given without labels. The val splits are untouched (never trained or tuned on). The
teacher is the given checkpoint (the generalist teacher was trained on every training image with
its labels, so on this pool it is an upper bound, as a bundled teacher is for a user's images).

Rows, each student with the same architecture, schedule, batch, crop and augmentation:

- classical: the classical pipeline (no decoder to tune);
- teacher: the teacher checkpoint;
- student, no distillation: segmentation loss on the labelled images only (method ``none``);
- student, pseudo-labels: labelled images plus the unlabelled ones with the teacher's decoded
  instances as ordinary labels (method ``pseudo``, no distillation terms): the fair baseline for
  unlabelled data;
- student + GRD: labelled images plus the unlabelled ones, whose teacher instances are graph nodes of
  the distillation terms while the segmentation loss ignores them (method ``grd``).

Every source (two labelled, two unlabelled) is one source of the balanced sampling, as in ``graphkd
distill``. Every network row is scored at its last checkpoint with decoder settings chosen on the
tune splits (the mean over sources of the pooled selection score,
napari_graphkd.evaluation.selection_score), then run on val as ``graphkd segment`` runs a user's image
(automatic size, polarity and channel). Resumable: every run resumes from its folder and every finished
row is cached as JSON, so the table can be built over several invocations (``--only``).

    python benchmarks/generalist_distill.py --teacher T --data DATA --runs RUNS [--steps N] [--seeds 0 1 2]
    python benchmarks/generalist_distill.py ... --only grd_s0 pseudo_s0     # some rows only (several processes)
    python benchmarks/generalist_distill.py ... --report                    # table from cached rows only
    python benchmarks/generalist_distill.py ... --prepare                   # only the shared caches (run it first)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from distill_table import STUDENT, STUDENT_GRID, fmt, table, timed_scores
from provenance import command_line, header, write_results, write_row

from napari_graphkd.data import AugmentConfig, Source, find_part, load_source, parse_source, read_split, read_tiff, split_list_path
from napari_graphkd.distill import method_weights
from napari_graphkd.evaluation import DECODE_GRID, network_outputs, score_by_source, tune_decoder
from napari_graphkd.segment import ClassicalSegmenter, ModelSegmenter, RunSettings
from napari_graphkd.train.distill import DistillSettings, distill_student
from napari_graphkd.train.loop import TrainSettings
from napari_graphkd.train.pseudo import UnlabelledSource, parse_unlabelled

LABELLED_FRACTION = 0.25
SPLIT_SEED = 0
# bundled split name, folder under --data (either layout of `graphkd data` or the plain annotated folders)
SOURCES = (("bbbc039", "bbbc039/train"), ("dsb2018_fluo", "dsb2018_fluo"))
VAL_SETS = (("BBBC039 val", "bbbc039", "bbbc039"), ("DSB2018 fluorescence val", "dsb2018_fluo", "dsb2018_fluo"))
ROWS = {  # key prefix: (table row, method, uses the unlabelled images)
    "plain": ("student, no distillation", "none", False),
    "pseudo": ("student, pseudo-labels (teacher's labels of the unlabelled images as targets)", "pseudo", True),
    "grd": ("student + GRD (unlabelled images: teacher instances as graph nodes)", "grd", True),
}
AUTO = RunSettings()  # what `graphkd segment` does with a user's image


def write_splits(folder: Path, fraction: float, limit: int | None) -> dict[str, dict[str, list[str]]]:
    """Per source, the labelled and unlabelled stems of its train list (seeded), written as split lists under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, _ in SOURCES:
        train = read_split(split_list_path(name, "train"))[:limit]
        tune = read_split(split_list_path(name, "tune"))[:limit]
        order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
        k = max(1, round(fraction * len(train)))
        parts = {"labelled": sorted(train[i] for i in order[:k]), "unlabelled": sorted(train[i] for i in order[k:])}
        for part, stems in parts.items():
            for kind, lines in (("train", stems), ("tune", tune)):
                (folder / f"{name}-{part}_{kind}.txt").write_text("\n".join(lines) + "\n")
        out[name] = parts
    return out


def sources(args) -> tuple[list[Source], list[UnlabelledSource]]:
    """The labelled sources (labelled stems, tune lists) and the unlabelled sources (the other train images)."""
    lists = Path(args.runs) / "splits"
    labelled = [parse_source(f"{Path(args.data) / sub}@{lists / f'{name}-labelled'}") for name, sub in SOURCES]
    unlabelled = [parse_unlabelled(f"{Path(args.data) / sub}@{lists / f'{name}-unlabelled'}") for name, sub in SOURCES]
    return labelled, unlabelled


def tune_sets(labelled: list[Source]) -> dict[str, list]:
    """Tune samples per source at the model's scale (as napari_graphkd.train.segmentation.tune_sets loads them)."""
    return {s.name: load_source(replace(s, train=()))[1] for s in labelled}


def val_sets(data: Path, limit: int | None) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(raw image, labels) of each val split, as a user would open them."""
    out = {}
    for title, split, sub in VAL_SETS:
        stems = read_split(split_list_path(split, "val"))[:limit]
        folder = find_part(data / sub, "val", stems)
        out[title] = [(read_tiff(folder / "images" / f"{s}.tif"), read_tiff(folder / "labels" / f"{s}.tif").astype(np.int32))
                      for s in stems]
    return out


def evaluate(segmenter, grid, tune: dict[str, list], val: dict[str, list], threads: int) -> dict:
    """Decoder tuned on the tune sets (networks), then every val set scored and timed with automatic input rules."""
    decode, tune_scores = None, None
    if segmenter.kind == "network":
        samples = [s for group in tune.values() for s in group]
        torch.set_num_threads(threads)
        decode, tune_scores, _ = tune_decoder(network_outputs(segmenter.model, samples), samples, segmenter.decode_settings,
                                              grid, score=score_by_source([len(g) for g in tune.values()]))
    return {"val": {name: timed_scores(segmenter, pairs, threads, decode, AUTO) for name, pairs in val.items()},
            "parameters": segmenter.parameters, "decode": None if decode is None else decode.to_dict(), "tune": tune_scores}


def teacher_data(path: str | Path) -> str:
    """What the teacher was trained on, from its checkpoint metadata (sources and image counts)."""
    from napari_graphkd.io.checkpoint import read_metadata

    data = read_metadata(path).get("training_data", {})
    if data.get("sources"):
        return ", ".join(f"{s['name']} ({s['train_images']} images with labels)" for s in data["sources"])
    return f"{data.get('train_images', '?')} labelled images of {Path(data.get('folder') or '?').name}"


def digest(path: str | Path) -> str:
    """First 16 hex digits of a file's SHA-256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def train_row(key: str, args, run_dir: Path | None = None, steps: int | None = None) -> Path:
    """Train (or resume) one student row in ``RUNS/KEY`` (or ``run_dir``, for ``steps``); returns its folder."""
    prefix, seed = key.rsplit("_s", 1)
    _, method, with_unlabelled = ROWS[prefix]
    labelled, unlabelled = sources(args)
    settings = TrainSettings(steps=args.steps if steps is None else steps, batch_size=4, lr=2e-3, seed=int(seed), validate_every=10**9, snapshot_every=10**9,
                             augment=AugmentConfig(crop=256, acquisition_prob=args.acquisition_aug))
    distill = DistillSettings(method=method, weights=method_weights(method))
    torch.set_num_threads(args.train_threads)
    run_dir = run_dir or Path(args.runs) / key
    start = time.time()
    distill_student(args.teacher, labelled, run_dir, STUDENT, settings, distill, unlabelled=unlabelled if with_unlabelled else (),
                    command=command_line(), on_status=lambda m: print(f"  {key}: {m}", flush=True),
                    targets_dir=Path(args.runs) / "cache" / ("all" if with_unlabelled else "labelled"))
    print(f"  {key}: trained/resumed in {time.time() - start:.0f} s", flush=True)
    return run_dir


def prepare(args) -> None:
    """Fill the caches every student row reads (the teacher's decoded instances and outputs) without training a row."""
    for key in ("grd_s0", "plain_s0"):
        with tempfile.TemporaryDirectory() as tmp:
            train_row(key, args, Path(tmp) / key, steps=0)


def row_result(key: str, args, tune, val) -> dict:
    """Cached result of one row; trains and evaluates it first if selected (``--only``) and not cached."""
    cache = Path(args.results) / "rows" / f"{key}.json"
    expected = {"teacher_sha256_16": digest(args.teacher), "steps": None if key in ("classical", "teacher") else args.steps,
                "labelled_fraction": LABELLED_FRACTION, "max_images": args.max_images}
    if cache.exists():
        result = json.loads(cache.read_text())
        if {k: result.get(k) for k in expected} != expected:
            raise SystemExit(f"{cache} was made with another teacher, schedule or data ({ {k: result.get(k) for k in expected} }); "
                             f"move it (and its run folder) away")
        return result
    if args.report or (args.only is not None and key not in args.only):
        return {}
    if key == "classical":
        result = evaluate(ClassicalSegmenter(), None, tune, val, args.threads)
    elif key == "teacher":
        result = evaluate(ModelSegmenter(args.teacher), DECODE_GRID, tune, val, args.threads)
    else:
        run_dir = train_row(key, args)
        progress = json.loads((run_dir / "progress.json").read_text())
        result = evaluate(ModelSegmenter(run_dir / "last.safetensors"), STUDENT_GRID, tune, val, args.threads)
        result.update(peak_train_mb=progress.get("peak_rss_mb"), train_seconds=progress.get("seconds"),
                      seconds_per_step=progress.get("seconds") / max(1, progress["step"]), train_threads=args.train_threads)
    result.update(expected, key=key)
    write_row(cache, result)
    return result


def for_set(result: dict, name: str) -> dict:
    """One val set's scores of a row, in the shape distill_table.table reads."""
    return {} if not result else {**result["val"][name], "parameters": result["parameters"],
                                  "peak_train_mb": result.get("peak_train_mb") or 0.0}


def verdict(rows: dict[str, list[dict]], refs: dict[str, dict], name: str) -> str:
    """Plain sentences: share of the teacher - plain gap GRD recovers, and GRD against pseudo-labels beyond the seed spread."""
    f1 = {prefix: [r["val"][name]["metrics"]["f1@0.5"] for r in rows[prefix] if r] for prefix in ROWS}
    if not all(len(v) >= 2 for v in f1.values()) or "teacher" not in refs:
        return "(needs at least two seeds of every student row and the teacher row)"
    plain, pseudo, grd = (statistics.mean(f1[p]) for p in ("plain", "pseudo", "grd"))
    gap = refs["teacher"]["val"][name]["metrics"]["f1@0.5"] - plain
    spread = statistics.stdev(f1["grd"]) + statistics.stdev(f1["pseudo"])
    recovered = f"{100 * (grd - plain) / gap:.0f} %" if gap > 0 else "– (no gap: the plain student is not below the teacher)"
    beats = "beats" if grd - pseudo > spread else "does not beat"
    return (f"GRD recovers {recovered} of the teacher - plain-student F1 gap (target >= 50 %); GRD - pseudo-labels = "
            f"{grd - pseudo:+.3f} F1 against a seed spread (sum of the two standard deviations) of {spread:.3f}: GRD {beats} "
            f"pseudo-labels beyond the seed spread.")


def report(args, splits: dict, row_results: dict[str, list[dict]], refs: dict[str, dict], val: dict) -> str:
    """The markdown result: protocol, the pool of labelled and unlabelled images, one table per val set, training times."""
    counts = "; ".join(f"{name}: {len(p['labelled'])} labelled, {len(p['unlabelled'])} unlabelled" for name, p in splits.items())
    command = (f"python benchmarks/generalist_distill.py --teacher TEACHER --data DATA --runs RUNS --steps {args.steps} "
               f"--seeds {' '.join(map(str, args.seeds))}" + (f" --max-images {args.max_images}" if args.max_images else ""))
    text = [f"# Distillation on the generalist pair: a few labelled images, many without labels\n\n{header()}\n",
            f"Made by `{command}` (`--only KEY...` trains some rows; `--report` assembles the cached ones). "
            f"Teacher `{Path(args.teacher).name}` (sha256 {digest(args.teacher)}).\n",
            f"**Training pool.** From each bundled train list, {LABELLED_FRACTION:.0%} of the images (seeded random choice, "
            f"seed {SPLIT_SEED}; lists in RUNS/splits) keep their labels; the others are given without labels ({counts}). "
            f"The tune lists choose decoder settings, the val lists are untouched. The teacher was trained on "
            f"{teacher_data(args.teacher)}: where that includes the unlabelled images' labels it is an upper bound for a "
            f"student here, as a bundled teacher is on a user's images."
            + (f" **Smoke run: at most {args.max_images} images per list**, not a result." if args.max_images else "") + "\n",
            f"Students: `{STUDENT}`, {args.steps} steps, batch 4, crop 256, AdamW 2e-3 cosine, camera augmentation "
            f"p={args.acquisition_aug:g} on the student's input; each source (two labelled, two unlabelled) drawn equally "
            f"often. Scored at the last checkpoint; decoder settings chosen on the tune splits; val run with automatic size, "
            f"polarity and channel (as `graphkd segment`). Times: per image including the size estimate, {args.threads} "
            f"thread(s). Gap = share of the teacher - plain-student gap recovered.\n"]
    for name, pairs in val.items():
        rows = {ROWS[p][0]: [for_set(r, name) for r in rs] for p, rs in row_results.items()}
        set_refs = {k: for_set(r, name) for k, r in refs.items() if r}
        text.append(f"## {name} ({len(pairs)} images)\n\n" + table(rows, set_refs) + "\n" + verdict(row_results, refs, name) + "\n")
    lines = ["| row | seeds | s per training step | training minutes | peak training MB |", "|---|---|---|---|---|"]
    for prefix, rs in row_results.items():
        done = [r for r in rs if r]
        if done:
            lines.append(f"| {ROWS[prefix][0]} | {len(done)} | {fmt([r['seconds_per_step'] for r in done], 2)} | "
                         f"{fmt([r['train_seconds'] / 60 for r in done], 0)} | {fmt([r['peak_train_mb'] for r in done], 0)} |")
    threads = {r.get("train_threads") for rs in row_results.values() for r in rs if r}
    text.append(f"## Training cost ({'/'.join(map(str, sorted(t for t in threads if t))) or '?'} thread(s) per run; "
                f"the machine was shared, so times are upper bounds)\n\n" + "\n".join(lines) + "\n")
    return "\n".join(text)


def main() -> int:
    """Run (or resume) every row, then write RESULTS/generalist_distill.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (decoder settings in its metadata decode the "
                        "unlabelled images: export it with tuned settings first)")
    parser.add_argument("--data", required=True, help="the folder laid out by `graphkd data` (bbbc039/, dsb2018_fluo/)")
    parser.add_argument("--runs", required=True, help="folder of the training runs, split lists and caches (resumable)")
    parser.add_argument("--results", default="benchmarks/results/generalist_distill")
    parser.add_argument("--steps", type=int, default=2000, help="schedule of every student row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--acquisition-aug", type=float, default=0.5, help="camera augmentation of the student's input")
    parser.add_argument("--threads", type=int, default=2, help="threads for scoring and timing")
    parser.add_argument("--train-threads", type=int, default=1, help="threads per training run")
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images per list (smoke runs only)")
    parser.add_argument("--only", nargs="*", default=None, help="row keys to run: classical, teacher, plain_s0, pseudo_s1, grd_s2, ...")
    parser.add_argument("--report", action="store_true", help="only assemble the table from cached rows")
    parser.add_argument("--prepare", action="store_true", help="only compute the caches the student rows share (the "
                        "teacher's instances on the unlabelled images and its outputs; once per teacher), then stop")
    args = parser.parse_args()

    splits = write_splits(Path(args.runs) / "splits", LABELLED_FRACTION, args.max_images)
    if args.prepare:
        prepare(args)
        return 0
    labelled, _ = sources(args)
    tune, val = tune_sets(labelled), val_sets(Path(args.data), args.max_images)
    refs = {key: row_result(key, args, tune, val) for key in ("classical", "teacher")}
    row_results = {prefix: [row_result(f"{prefix}_s{seed}", args, tune, val) for seed in args.seeds] for prefix in ROWS}
    text = report(args, splits, row_results, refs, val)
    write_results(Path(args.results) / "generalist_distill.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
