"""3D benchmark: EM neurites (em3d_gala) and light-sheet nuclei (nuclei3d_lightsheet), baselines and 3D models.

Protocol: the bundled volume splits (``splits/volumes.tsv``); every row chooses its settings on the
tune slab (a grid, below) and is then scored once on the test slab. EM: the em3d_gala test volume,
ground-truth ids under 100 voxels dropped, VOI split / merge / sum (bits) and adapted Rand error
(lower is better). Nuclei: the test slab of nuclei3d_lightsheet, 3D F1@0.5 and AJI (higher is
better). Times are wall seconds per test volume (network + decoding), ``--threads`` torch threads.

Rows:
- EM, seeded watershed: the raw volume's smoothed, inverted intensity is the boundary map (membranes
  are dark), seeds are the interior's distance ridges (decode.volume_baselines.seeded_watershed).
- Nuclei, 3D Otsu + distance-transform watershed (decode.volume_baselines.otsu_watershed_3d).
- Nuclei, the bundled 2D student and teacher (and the BBBC039-only pair) run plane by plane (segment_any), linked across z by
  overlap (decode.volume_baselines.link_planes); nucleus diameter, linking IoU and the smallest kept
  object chosen on the tune slab.
- 3D networks, trained on the train slab only: the 3D teacher (``unet3d-teacher``, train_volumes),
  the 3D student (``unet3d-student``) without distillation and with GRD (distill_volume_student,
  the same pipeline, 3 seeds each), scored at their last checkpoint (no checkpoint selection) with
  the mutex-watershed decoder's settings chosen on the tune slab. EM labels have no background, so
  voxels the decoder leaves unassigned take their nearest segment (fill_background). For EM also the
  seeded watershed on the 3D teacher's boundaries (1 - mean nearest-neighbour affinity).
  Schedules are CPU-sized (``--teacher-steps``, ``--student-steps``; batch 2 crops of ``CROP``).

Every finished row is cached as JSON (``RESULTS/volume_rows/KEY.json``), so the table can be built
over several invocations:

    python benchmarks/volume_table.py --data DATA --runs RUNS              # every missing row
    python benchmarks/volume_table.py --data DATA --runs RUNS --only em_seeded
    python benchmarks/volume_table.py --data DATA --runs RUNS --report     # table from cached rows only
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from provenance import command_line, git_commit, header, write_results, write_row

from napari_graphkd.affinity import is_short, offsets_from_metadata
from napari_graphkd.data import AugmentConfig, Sample
from napari_graphkd.decode.mws import DecodeSettings, decode
from napari_graphkd.decode.policy import decoding_affinities
from napari_graphkd.decode.volume_baselines import (
    NucleiSettings,
    SeededSettings,
    dark_membrane_boundaries,
    fill_background,
    link_planes,
    otsu_watershed_3d,
    seeded_watershed,
)
from napari_graphkd.distill import method_weights
from napari_graphkd.io.checkpoint import load_checkpoint
from napari_graphkd.io.volumes import VolumeSlab, load_slab, read_volume_splits
from napari_graphkd.metrics import EM_MIN_VOXELS, em_scores, evaluate
from napari_graphkd.models import EmbeddingUNet, count_parameters
from napari_graphkd.preprocess import normalize
from napari_graphkd.segment import load_segmenter, segment_any
from napari_graphkd.train.distill import DistillSettings, distill_volume_student
from napari_graphkd.train.loop import TrainSettings
from napari_graphkd.train.segmentation import train_volumes

EM, NUCLEI = "em3d_gala", "nuclei3d_lightsheet"
# Tune-slab grids of the baselines (every combination is tried).
SEEDED_GRID = {"sigma": (1.0, 2.0), "threshold": (0.5, 0.6, 0.7, 0.8), "seed_smooth": (1.0, 2.0), "h": (0.5, 1.0, 2.0, 4.0),
               "min_size": (100, 1000)}
OTSU_GRID = {"sigma": (1.0, 2.0), "min_distance": (6.0, 9.0, 12.0, 15.0), "min_size": (200, 1000, 3000)}
LINK_GRID = {"diameter": ("auto", 16.0, 20.0, 24.0, 28.0, 34.0), "min_iou": (0.2, 0.3, 0.5), "min_size": (0, 1000, 3000)}
# Mutex-watershed decoder grid of the 3D networks (voxel sizes), and the seeded watershed on a network's boundaries.
DECODE_GRID = {EM: {"attractive_bias": (0.0, 0.3, 0.5), "min_size": (100, 1000)},
               NUCLEI: {"attractive_bias": (0.0, 0.3, 0.5), "min_size": (200, 1000, 3000)}}
BOUNDARY_GRID = {"threshold": (0.3, 0.5, 0.7), "seed_smooth": (1.0,), "h": (0.5, 1.0, 2.0, 4.0), "min_size": (100, 1000)}
TEACHER, STUDENT = "unet3d-teacher", "unet3d-student"
CROP = (16, 64, 64)  # (z, y, x) training crop of every 3D network
SEEDS = (0, 1, 2)
# Groups of the 3D network rows, in table order (the students' rows are means over SEEDS).
MODEL_ROWS = (f"3D teacher ({TEACHER})", f"3D student ({STUDENT}), no distillation", f"3D student ({STUDENT}) + GRD")

Settings = dict[str, Any]
Scores = dict[str, float]


def grid(options: dict[str, Iterable]) -> list[Settings]:
    """Every combination of the options, as dicts."""
    return [dict(zip(options, values)) for values in itertools.product(*options.values())]


def em_rank(scores: Scores) -> float:
    """EM selection score (higher is better): minus the VOI sum."""
    return -scores["voi"]


def nuclei_rank(scores: Scores) -> float:
    """Nuclei selection score: mean of F1@0.5 and AJI."""
    return (scores["f1@0.5"] + scores["aji"]) / 2


def nuclei_scores(gt: np.ndarray, labels: np.ndarray) -> Scores:
    """3D F1@0.5, AJI and object counts of one volume."""
    scores = evaluate(gt, labels)
    return {k: scores[k] for k in ("f1@0.5", "aji", "n_gt", "n_pred")}


def choose(candidates: list[Settings], segment: Callable[[Settings], np.ndarray], score: Callable[[np.ndarray], Scores],
           rank: Callable[[Scores], float]) -> tuple[Settings, Scores]:
    """The candidate settings whose segmentation of the tune slab ranks best, with its tune scores (first wins ties)."""
    best: tuple[float, Settings, Scores] | None = None
    for settings in candidates:
        scores = score(segment(settings))
        if best is None or rank(scores) > best[0]:
            best = (rank(scores), settings, scores)
    assert best is not None
    return best[1], best[2]


def timed(segment: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """(labels, wall seconds) of one segmentation."""
    start = time.perf_counter()
    labels = segment()
    return labels, time.perf_counter() - start


def seeded_labels(slab: VolumeSlab, s: Settings) -> np.ndarray:
    """Seeded watershed of an EM slab with one grid point's settings."""
    boundaries = dark_membrane_boundaries(slab.image, slab.voxel_size, s["sigma"])
    return seeded_watershed(boundaries, slab.voxel_size, SeededSettings(s["threshold"], s["seed_smooth"], s["h"], s["min_size"]))


def em_seeded_row(tune: VolumeSlab, test: VolumeSlab) -> dict:
    """EM baseline: seeded watershed on the raw intensity, settings chosen on the tune slab."""
    settings, tune_scores = choose(grid(SEEDED_GRID), lambda s: seeded_labels(tune, s), lambda lab: em_scores(lab, tune.labels),
                                   em_rank)
    labels, seconds = timed(lambda: seeded_labels(test, settings))
    return {"row": "seeded watershed (raw intensity, membranes dark)", "parameters": 0, "settings": settings,
            "tune": tune_scores, "test": em_scores(labels, test.labels), "seconds": seconds, "n_segments": int(labels.max())}


def nuclei_otsu_row(tune: VolumeSlab, test: VolumeSlab) -> dict:
    """Nuclei baseline: 3D Otsu + distance-transform watershed, settings chosen on the tune slab."""
    def run(slab: VolumeSlab, s: Settings) -> np.ndarray:
        return otsu_watershed_3d(slab.image, slab.voxel_size, NucleiSettings(**s))

    settings, tune_scores = choose(grid(OTSU_GRID), lambda s: run(tune, s), lambda lab: nuclei_scores(tune.labels, lab),
                                   nuclei_rank)
    labels, seconds = timed(lambda: run(test, settings))
    return {"row": "3D Otsu + distance-transform watershed", "parameters": 0, "settings": settings, "tune": tune_scores,
            "test": nuclei_scores(test.labels, labels), "seconds": seconds}


def nuclei_linked_row(name: str, tune: VolumeSlab, test: VolumeSlab) -> dict:
    """Nuclei baseline: a bundled 2D model run plane by plane, planes linked by overlap; settings chosen on the tune slab.

    The network runs once per diameter; linking IoU and smallest object are swept on its labels.
    """
    segmenter = load_segmenter(name)
    planes = {d: segment_any(segmenter, tune.image, diameter=d).labels for d in LINK_GRID["diameter"]}
    settings, tune_scores = choose(grid(LINK_GRID), lambda s: link_planes(planes[s["diameter"]], s["min_iou"], s["min_size"]),
                                   lambda lab: nuclei_scores(tune.labels, lab), nuclei_rank)

    def run() -> np.ndarray:
        per_plane = segment_any(segmenter, test.image, diameter=settings["diameter"]).labels
        return link_planes(per_plane, settings["min_iou"], settings["min_size"])

    labels, seconds = timed(run)
    return {"row": f"bundled 2D `{name}`, plane by plane, linked across z", "parameters": segmenter.parameters,
            "settings": settings, "tune": tune_scores, "test": nuclei_scores(test.labels, labels), "seconds": seconds}


def train_sample(slab: VolumeSlab) -> Sample:
    """A training sample of a slab: the normalised volume and its labels."""
    return Sample(slab.name, normalize(slab.image), slab.labels)


def schedule(steps: int, seed: int) -> TrainSettings:
    """CPU-sized schedule: batch 2 crops of CROP, AdamW 2e-3 with a short warm-up, saved every 50 steps (resumable).

    float32: with bfloat16 autocast the 3D teacher's loss turned NaN within 12-30 steps (float32 trained).
    """
    return TrainSettings(steps=steps, batch_size=2, lr=2e-3, warmup=max(1, steps // 10), seed=seed, save_every=50,
                         snapshot_every=10**9, validate_every=10**9, bf16=False, augment=AugmentConfig(crop=CROP[-1]))


def teacher_checkpoint(args, dataset: str, train: VolumeSlab) -> Path:
    """The 3D teacher of a dataset, trained (or resumed) on its train slab; its last checkpoint."""
    run_dir = Path(args.runs) / dataset / "teacher3d"
    if not (run_dir / "last.safetensors").exists() or json.loads((run_dir / "progress.json").read_text())["step"] < args.teacher_steps:
        start = time.time()
        train_volumes([train_sample(train)], run_dir, TEACHER, schedule(args.teacher_steps, 0), crop=CROP,
                      voxel_size=train.voxel_size, command=command_line())
        print(f"  {dataset} teacher: trained/resumed in {time.time() - start:.0f} s", flush=True)
    return run_dir / "last.safetensors"


def student_checkpoint(args, dataset: str, train: VolumeSlab, method: str, seed: int) -> Path:
    """A 3D student (``none`` = no distillation, ``grd``) distilled from the dataset's teacher; its last checkpoint."""
    run_dir = Path(args.runs) / dataset / f"{method}_s{seed}"
    teacher = teacher_checkpoint(args, dataset, train)
    if not (run_dir / "last.safetensors").exists() or json.loads((run_dir / "progress.json").read_text())["step"] < args.student_steps:
        start = time.time()
        distill_volume_student(teacher, [train_sample(train)], run_dir, STUDENT, schedule(args.student_steps, seed),
                               DistillSettings(method=method, weights=method_weights(method)), crop=CROP,
                               command=command_line(), targets_dir=Path(args.runs) / dataset / "teacher-targets")
        print(f"  {dataset} {method} seed {seed}: trained/resumed in {time.time() - start:.0f} s", flush=True)
    return run_dir / "last.safetensors"


def network_maps(model: EmbeddingUNet, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Embedding (C,Z,Y,X) and foreground probability (Z,Y,X) of a whole normalised volume, in one pass."""
    model.eval()
    with torch.no_grad():
        emb, fg, _ = model.forward_padded(torch.from_numpy(normalize(image))[None, None])
    window = (slice(None),) + tuple(slice(0, n) for n in image.shape)
    return emb[0][window].numpy(), None if fg is None else torch.sigmoid(fg[0, 0][window[1:]]).numpy()


def decode_volume(maps: tuple[np.ndarray, np.ndarray | None], settings: DecodeSettings, offsets, dataset: str) -> np.ndarray:
    """Mutex-watershed labels of a volume's network maps (EM: unassigned voxels filled from their nearest segment)."""
    emb, fg = maps
    labels = decode(decoding_affinities(emb, settings, offsets), fg, settings, offsets)
    return fill_background(labels) if dataset == EM else labels


def score_volume(dataset: str, gt: np.ndarray, labels: np.ndarray) -> Scores:
    """The dataset's scores of one volume."""
    return em_scores(labels, gt) if dataset == EM else nuclei_scores(gt, labels)


def rank_of(dataset: str) -> Callable[[Scores], float]:
    """The dataset's selection score."""
    return em_rank if dataset == EM else nuclei_rank


def network_row(path: Path, dataset: str, tune: VolumeSlab, test: VolumeSlab, row: str) -> dict:
    """Score a 3D checkpoint: decoder settings chosen on the tune slab, the test slab scored and timed."""
    model, meta = load_checkpoint(path)
    offsets = offsets_from_metadata(meta)
    tune_maps = network_maps(model, tune.image)
    chosen, tune_scores = choose([dict(zip(DECODE_GRID[dataset], v)) for v in itertools.product(*DECODE_GRID[dataset].values())],
                                 lambda s: decode_volume(tune_maps, DecodeSettings(**s), offsets, dataset),
                                 lambda lab: score_volume(dataset, tune.labels, lab), rank_of(dataset))
    start = time.perf_counter()
    maps = network_maps(model, test.image)
    network_seconds = time.perf_counter() - start
    labels, decode_seconds = timed(lambda: decode_volume(maps, DecodeSettings(**chosen), offsets, dataset))
    return {"row": row, "parameters": count_parameters(model), "settings": chosen, "tune": tune_scores,
            "test": score_volume(dataset, test.labels, labels), "seconds": network_seconds + decode_seconds,
            "network_seconds": network_seconds, "decode_seconds": decode_seconds, "step": meta.get("step"),
            "checkpoint": f"RUNS/{dataset}/{path.parent.name}/{path.name}"}


def boundary_map(model: EmbeddingUNet, image: np.ndarray, offsets) -> np.ndarray:
    """1 - mean nearest-neighbour affinity of a network's embedding: its predicted boundaries."""
    emb, _ = network_maps(model, image)
    affinities = decoding_affinities(emb, DecodeSettings(long_range_stride=1), offsets)
    short = [k for k, o in enumerate(offsets) if is_short(o)]
    return (1.0 - affinities[short].mean(axis=0)).astype(np.float32)


def em_teacher_seeded_row(path: Path, tune: VolumeSlab, test: VolumeSlab) -> dict:
    """EM: the seeded watershed on the 3D teacher's predicted boundaries, settings chosen on the tune slab."""
    model, meta = load_checkpoint(path)
    offsets = offsets_from_metadata(meta)
    tune_boundaries = boundary_map(model, tune.image, offsets)
    chosen, tune_scores = choose(grid(BOUNDARY_GRID),
                                 lambda s: seeded_watershed(tune_boundaries, tune.voxel_size, SeededSettings(**s)),
                                 lambda lab: em_scores(lab, tune.labels), em_rank)
    labels, seconds = timed(lambda: seeded_watershed(boundary_map(model, test.image, offsets), test.voxel_size,
                                                     SeededSettings(**chosen)))
    return {"row": "seeded watershed on the 3D teacher's boundaries", "parameters": count_parameters(model),
            "settings": chosen, "tune": tune_scores, "test": em_scores(labels, test.labels), "seconds": seconds}


def model_plan(args) -> dict[str, tuple[str, str, Callable[[VolumeSlab], Path], str]]:
    """Rows of the 3D networks: key -> (dataset, group name, checkpoint maker (given the train slab), kind)."""
    plan = {}
    for dataset, prefix in ((EM, "em"), (NUCLEI, "nuclei")):
        plan[f"{prefix}_teacher3d"] = (dataset, MODEL_ROWS[0], lambda tr, d=dataset: teacher_checkpoint(args, d, tr), "mws")
        if dataset == EM:
            plan["em_teacher3d_seeded"] = (dataset, "seeded watershed on the 3D teacher's boundaries",
                                           lambda tr: teacher_checkpoint(args, EM, tr), "seeded")
        for seed, (method, group) in itertools.product(SEEDS, (("none", MODEL_ROWS[1]), ("grd", MODEL_ROWS[2]))):
            plan[f"{prefix}_{method}_s{seed}"] = (dataset, group, lambda tr, d=dataset, m=method, s=seed:
                                                  student_checkpoint(args, d, tr, m, s), "mws")
    return plan


BASELINES: dict[str, tuple[str, Callable[[VolumeSlab, VolumeSlab], dict]]] = {
    "em_seeded": (EM, em_seeded_row),
    "nuclei_otsu3d": (NUCLEI, nuclei_otsu_row),
    "nuclei_student2d_linked": (NUCLEI, lambda tune, test: nuclei_linked_row("student", tune, test)),
    "nuclei_teacher2d_linked": (NUCLEI, lambda tune, test: nuclei_linked_row("teacher", tune, test)),
    "nuclei_student-bbbc039_2d_linked": (NUCLEI, lambda tune, test: nuclei_linked_row("student-bbbc039", tune, test)),
    "nuclei_teacher-bbbc039_2d_linked": (NUCLEI, lambda tune, test: nuclei_linked_row("teacher-bbbc039", tune, test)),
}


def compute_row(key: str, args, slab: Callable[[str, str], VolumeSlab]) -> dict:
    """Compute one row: a baseline, or a 3D network (trained or resumed first) scored with its chosen settings."""
    if key in BASELINES:
        dataset, make = BASELINES[key]
        return {"dataset": dataset, **make(slab(dataset, "tune"), slab(dataset, "test"))}
    dataset, group, checkpoint, kind = model_plan(args)[key]
    path = checkpoint(slab(dataset, "train"))
    torch.set_num_threads(args.threads)  # the training loop may have changed it
    if kind == "seeded":
        return {"dataset": dataset, **em_teacher_seeded_row(path, slab(dataset, "tune"), slab(dataset, "test"))}
    return {"dataset": dataset, **network_row(path, dataset, slab(dataset, "tune"), slab(dataset, "test"), group)}


def cached_row(key: str, args, slab: Callable[[str, str], VolumeSlab]) -> dict | None:
    """The cached result of row ``key``; computed first (and cached) unless ``--report`` or not in ``--only``."""
    path = Path(args.results) / "volume_rows" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    if args.report or (args.only is not None and key not in args.only):
        return None
    print(f"  {key} ...", flush=True)
    result = {"key": key, "commit": git_commit(), "threads": args.threads, **compute_row(key, args, slab)}
    write_row(path, result)
    print(f"  {key}: test {result['test']}", flush=True)
    return result


def describe(settings: Settings) -> str:
    """Settings as ``name=value`` pairs."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def fmt(values: list[float], digits: int = 3) -> str:
    """The value, or mean ± standard deviation over seeds."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def grouped(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by their table row (the seeds of one student setting share one), in order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["row"], []).append(r)
    return groups


def settings_cell(results: list[dict]) -> str:
    """Chosen settings, or a note when the seeds chose differently."""
    first = results[0]["settings"]
    return describe(first) if all(r["settings"] == first for r in results) else "per seed (see the row files)"


def em_table(rows: list[dict], planned: list[str]) -> str:
    """Markdown table of the EM rows (planned groups without results shown as not run)."""
    lines = ["| row | seeds | parameters | settings (chosen on tune) | tune VOI | VOI split | VOI merge | VOI sum | ARAND | s / volume |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups = grouped(rows)
    for name, results in groups.items():
        cells = [fmt([r["test"][k] for r in results]) for k in ("voi_split", "voi_merge", "voi", "arand")]
        lines.append(f"| {name} | {len(results) if len(results) > 1 else '–'} | {results[0]['parameters']:,} | "
                     f"{settings_cell(results)} | {fmt([r['tune']['voi'] for r in results])} | " + " | ".join(cells)
                     + f" | {fmt([r['seconds'] for r in results], 1)} |")
    lines += [f"| {name} | | | | | | | | | (not run) |" for name in planned if name not in groups]
    return "\n".join(lines) + "\n"


def nuclei_table(rows: list[dict], planned: list[str]) -> str:
    """Markdown table of the nuclei rows (planned groups without results shown as not run)."""
    lines = ["| row | seeds | parameters | settings (chosen on tune) | tune F1@0.5 / AJI | F1@0.5 | AJI | nuclei (GT / found) | s / volume |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = grouped(rows)
    for name, results in groups.items():
        tune = f"{fmt([r['tune']['f1@0.5'] for r in results])} / {fmt([r['tune']['aji'] for r in results])}"
        found = ", ".join(f"{r['test']['n_pred']:.0f}" for r in results)
        lines.append(f"| {name} | {len(results) if len(results) > 1 else '–'} | {results[0]['parameters']:,} | "
                     f"{settings_cell(results)} | {tune} | {fmt([r['test']['f1@0.5'] for r in results])} | "
                     f"{fmt([r['test']['aji'] for r in results])} | {results[0]['test']['n_gt']:.0f} / {found} | "
                     f"{fmt([r['seconds'] for r in results], 1)} |")
    lines += [f"| {name} | | | | | | | | (not run) |" for name in planned if name not in groups]
    return "\n".join(lines) + "\n"


def slab_line(dataset: str, part: str) -> str:
    """``file z a-b`` of a split part."""
    spec = read_volume_splits()[dataset, part]
    return f"`{spec.file}` z {spec.z_start}-{spec.z_stop - 1}"


def main() -> int:
    """Compute (or read cached) rows, then print and write benchmarks/results/volume_table.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the data folder holding em3d_gala/ and nuclei3d_lightsheet/")
    parser.add_argument("--runs", required=True, help="folder of the 3D training runs (one sub-folder per run; resumable)")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every row and its timing")
    parser.add_argument("--teacher-steps", type=int, default=300, help="training steps of each 3D teacher")
    parser.add_argument("--student-steps", type=int, default=300, help="training steps of each 3D student")
    parser.add_argument("--only", nargs="*", default=None, help="row keys to compute (default: every missing row)")
    parser.add_argument("--report", action="store_true", help="only assemble the table from cached rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded: dict[tuple[str, str], VolumeSlab] = {}

    def slab(dataset: str, part: str) -> VolumeSlab:
        if (dataset, part) not in loaded:
            loaded[dataset, part] = load_slab(args.data, dataset, part)
        return loaded[dataset, part]

    keys = list(BASELINES) + list(model_plan(args))
    rows = [row for row in (cached_row(key, args, slab) for key in keys) if row]
    em_rows = [r for r in rows if r["dataset"] == EM]
    nuclei_rows = [r for r in rows if r["dataset"] == NUCLEI]
    planned = {d: list(dict.fromkeys(group for dd, group, _, _ in model_plan(args).values() if dd == d)) for d in (EM, NUCLEI)}
    text = (
        "# 3D benchmark: EM neurites and light-sheet nuclei\n\n"
        f"{header()}\n\n"
        "**Tiny data by the standards of 3D segmentation benchmarks**: one EM test volume of 50 x 100 x 200 voxels "
        "(about 45 neurites) and one nuclei test slab of 48 x 160 x 160 voxels (15 nuclei, some cut by the slab). "
        "Differences of a few hundredths are within what another volume would change. Every row chooses its settings "
        "on the tune slab (a grid; see the script) and is scored once on test; times are wall seconds per test volume "
        f"with {args.threads} torch thread(s) on a shared 2-core machine.\n\n"
        f"3D networks are trained on the train slab only, on a CPU-sized schedule: teacher {args.teacher_steps} steps, "
        f"students {args.student_steps} steps (no distillation and GRD: the same pipeline, seeds {', '.join(map(str, SEEDS))}; "
        f"mean ± standard deviation over seeds), batch 2 crops of {' x '.join(map(str, CROP))} voxels, float32; each is "
        "scored at its last step with the mutex-watershed settings chosen on the tune slab. The paper's schedules are "
        "orders of magnitude longer: these rows show the code path and where it stands on this machine, not the method's "
        "ceiling. Each row's file (`volume_rows/KEY.json`) records the commit it was computed with and every "
        "score.\n\n"
        f"## EM: em3d_gala, test volume (train {slab_line(EM, 'train')}, tune {slab_line(EM, 'tune')})\n\n"
        f"Ground-truth ids under {EM_MIN_VOXELS} voxels dropped; VOI in bits (split = false splits, merge = false "
        "merges), ARAND = adapted Rand error; lower is better.\n\n" + em_table(em_rows, planned[EM])
        + f"\n## Nuclei: nuclei3d_lightsheet, test slab {slab_line(NUCLEI, 'test')} (train {slab_line(NUCLEI, 'train')}, "
        f"tune {slab_line(NUCLEI, 'tune')})\n\n3D F1@0.5 and AJI (every nucleus counted once through the volume); "
        "higher is better.\n\n" + nuclei_table(nuclei_rows, planned[NUCLEI])
    )
    write_results(Path(args.results) / "volume_table.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
