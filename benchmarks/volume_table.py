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
- Nuclei, the bundled 2D student and teacher run plane by plane (segment_any), linked across z by
  overlap (decode.volume_baselines.link_planes); nucleus diameter, linking IoU and the smallest kept
  object chosen on the tune slab.

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
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from provenance import header

from napari_graphkd.decode.volume_baselines import (
    NucleiSettings,
    SeededSettings,
    dark_membrane_boundaries,
    link_planes,
    otsu_watershed_3d,
    seeded_watershed,
)
from napari_graphkd.io.volumes import VolumeSlab, load_slab, read_volume_splits
from napari_graphkd.metrics import EM_MIN_VOXELS, em_scores, evaluate
from napari_graphkd.segment import load_segmenter, segment_any

EM, NUCLEI = "em3d_gala", "nuclei3d_lightsheet"
# Tune-slab grids of the baselines (every combination is tried).
SEEDED_GRID = {"sigma": (1.0, 2.0), "threshold": (0.5, 0.6, 0.7, 0.8), "seed_smooth": (1.0, 2.0), "h": (0.5, 1.0, 2.0, 4.0),
               "min_size": (100, 1000)}
OTSU_GRID = {"sigma": (1.0, 2.0), "min_distance": (6.0, 9.0, 12.0, 15.0), "min_size": (200, 1000, 3000)}
LINK_GRID = {"diameter": ("auto", 16.0, 20.0, 24.0, 28.0, 34.0), "min_iou": (0.2, 0.3, 0.5), "min_size": (0, 1000, 3000)}

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
    return {"row": f"bundled 2D {name}, plane by plane, linked across z", "parameters": segmenter.parameters,
            "settings": settings, "tune": tune_scores, "test": nuclei_scores(test.labels, labels), "seconds": seconds}


BASELINES: dict[str, tuple[str, Callable[[VolumeSlab, VolumeSlab], dict]]] = {
    "em_seeded": (EM, em_seeded_row),
    "nuclei_otsu3d": (NUCLEI, nuclei_otsu_row),
    "nuclei_student2d_linked": (NUCLEI, lambda tune, test: nuclei_linked_row("student", tune, test)),
    "nuclei_teacher2d_linked": (NUCLEI, lambda tune, test: nuclei_linked_row("teacher", tune, test)),
}
# Rows of the 3D networks (trained on the train slab, settings chosen on tune), in table order.
MODEL_ROWS = {
    EM: ("3D teacher (unet3d-teacher)", "3D student, no distillation (3 seeds)", "3D student + GRD (3 seeds)"),
    NUCLEI: ("3D teacher (unet3d-teacher)", "3D student, no distillation (3 seeds)", "3D student + GRD (3 seeds)"),
}


def cached_row(key: str, args, slabs: Callable[[str], tuple[VolumeSlab, VolumeSlab]]) -> dict | None:
    """The cached result of row ``key``; computed first (and cached) unless ``--report`` or not in ``--only``."""
    path = Path(args.results) / "volume_rows" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    if args.report or (args.only is not None and key not in args.only):
        return None
    dataset, make = BASELINES[key]
    print(f"  {key} ...", flush=True)
    result = {"key": key, "dataset": dataset, "threads": args.threads, **make(*slabs(dataset))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"  {key}: test {result['test']}", flush=True)
    return result


def describe(settings: Settings) -> str:
    """Settings as ``name=value`` pairs."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def em_table(rows: list[dict]) -> str:
    """Markdown table of the EM rows."""
    lines = ["| row | parameters | settings (chosen on tune) | tune VOI | VOI split | VOI merge | VOI sum | ARAND | s / volume |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["test"]
        lines.append(f"| {r['row']} | {r['parameters']:,} | {describe(r['settings'])} | {r['tune']['voi']:.3f} | "
                     f"{t['voi_split']:.3f} | {t['voi_merge']:.3f} | {t['voi']:.3f} | {t['arand']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines + [f"| {name} | | | | | | | | (not run yet) |" for name in MODEL_ROWS[EM]]) + "\n"


def nuclei_table(rows: list[dict]) -> str:
    """Markdown table of the nuclei rows."""
    lines = ["| row | parameters | settings (chosen on tune) | tune F1@0.5 / AJI | F1@0.5 | AJI | nuclei (GT / found) | s / volume |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["test"]
        lines.append(f"| {r['row']} | {r['parameters']:,} | {describe(r['settings'])} | {r['tune']['f1@0.5']:.3f} / "
                     f"{r['tune']['aji']:.3f} | {t['f1@0.5']:.3f} | {t['aji']:.3f} | {t['n_gt']:.0f} / {t['n_pred']:.0f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines + [f"| {name} | | | | | | | (not run yet) |" for name in MODEL_ROWS[NUCLEI]]) + "\n"


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
    parser.add_argument("--only", nargs="*", default=None, help="row keys to compute (default: every missing row)")
    parser.add_argument("--report", action="store_true", help="only assemble the table from cached rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded: dict[str, tuple[VolumeSlab, VolumeSlab]] = {}

    def slabs(dataset: str) -> tuple[VolumeSlab, VolumeSlab]:
        if dataset not in loaded:
            loaded[dataset] = (load_slab(args.data, dataset, "tune"), load_slab(args.data, dataset, "test"))
        return loaded[dataset]

    rows = {key: cached_row(key, args, slabs) for key in BASELINES}
    em_rows = [r for r in rows.values() if r and r["dataset"] == EM]
    nuclei_rows = [r for r in rows.values() if r and r["dataset"] == NUCLEI]
    text = (
        "# 3D benchmark: EM neurites and light-sheet nuclei\n\n"
        f"{header()}\n\n"
        "**Tiny data by the standards of 3D segmentation benchmarks**: one EM test volume of 50 x 100 x 200 voxels "
        "(about 45 neurites) and one nuclei test slab of 48 x 160 x 160 voxels (15 nuclei, some cut by the slab). "
        "Differences of a few hundredths are within what another volume would change. Every row chooses its settings "
        "on the tune slab (a grid; see the script) and is scored once on test; times are wall seconds per test volume "
        f"with {args.threads} torch thread(s) on a shared 2-core machine.\n\n"
        f"## EM: em3d_gala, test volume (train {slab_line(EM, 'train')}, tune {slab_line(EM, 'tune')})\n\n"
        f"Ground-truth ids under {EM_MIN_VOXELS} voxels dropped; VOI in bits (split = false splits, merge = false "
        "merges), ARAND = adapted Rand error; lower is better.\n\n" + em_table(em_rows)
        + f"\n## Nuclei: nuclei3d_lightsheet, test slab {slab_line(NUCLEI, 'test')} (train {slab_line(NUCLEI, 'train')}, "
        f"tune {slab_line(NUCLEI, 'tune')})\n\n3D F1@0.5 and AJI (every nucleus counted once through the volume); "
        "higher is better.\n\n" + nuclei_table(nuclei_rows)
    )
    out = Path(args.results) / "volume_table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
