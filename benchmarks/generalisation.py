"""Generalisation table: classical / teacher / student (or any model specs) on each annotated test set.

Every model runs with its default settings, as ``graphkd segment`` does for a new user. Per set and
model: parameters, milliseconds per image (wall clock of the whole segmentation, mean over the
set), F1@0.5 and AJI (per-image means). Prints a markdown table and writes it, with the package
provenance line (version, git commit, command), to benchmarks/results/generalisation.md.

    python benchmarks/generalisation.py --data DATA [--model teacher --model student ...] [--set NAME=DIR[@LIST]]

``--data DATA`` uses the standard test sets found under DATA: BBBC039 val (``bbbc039/val``) and the
DSB2018 fluorescence val split (the images of ``dsb2018_fluo_val.txt`` in ``dsb2018_fluo`` or
``dsb2018_fluo/val``). ``--set`` adds any folder with images/ and labels/, optionally limited to
the stems of a split list (a bundled split name such as ``dsb2018_fluo_val``, or a .txt file).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from provenance import header, write_results

from napari_graphkd.data import SPLIT_DIR, read_split, read_tiff
from napari_graphkd.metrics import evaluate, mean_metrics
from napari_graphkd.runtime import configure_threads
from napari_graphkd.segment import load_segmenter, segment_any

RESULTS = Path(__file__).parent / "results" / "generalisation.md"
# name, candidate folders under --data, split list selecting the images
STANDARD_SETS = [
    ("BBBC039 val", ("bbbc039/val", "bbbc039_val"), "bbbc039_val"),
    ("DSB2018 fluorescence val", ("dsb2018_fluo/val", "dsb2018_fluo_val", "dsb2018_fluo"), "dsb2018_fluo_val"),
]


@dataclass(frozen=True)
class TestSet:
    """Annotated images to score on: a folder with images/ and labels/ and the stems to use."""

    name: str
    folder: Path
    stems: tuple[str, ...]


def list_stems(split: str | None) -> set[str] | None:
    """Stems of a split list: a .txt path or a bundled split name; None for no list."""
    if split is None:
        return None
    path = Path(split) if split.endswith(".txt") else SPLIT_DIR / f"{split}.txt"
    return set(read_split(path))


def make_set(name: str, folder: Path, split: str | None) -> TestSet:
    """The folder's images, limited to those in the split list when one is given."""
    images = sorted(p.stem for p in (folder / "images").glob("*.tif*"))
    wanted = list_stems(split)
    stems = [s for s in images if wanted is None or s in wanted]
    if not stems:
        raise SystemExit(f"generalisation: error: no images of {name} in {folder / 'images'}")
    return TestSet(name, folder, tuple(stems))


def standard_sets(root: Path) -> list[TestSet]:
    """The standard test sets found under ``root`` (a set whose folder is absent is skipped, with a note)."""
    found = []
    for name, candidates, split in STANDARD_SETS:
        folder = next((root / c for c in candidates if (root / c / "images").is_dir()), None)
        if folder is None:
            print(f"note: {name} not found under {root} (looked for {', '.join(candidates)})", file=sys.stderr)
            continue
        found.append(make_set(name, folder, split))
    return found


def parse_set(spec: str) -> TestSet:
    """``NAME=DIR`` or ``NAME=DIR@LIST``."""
    name, sep, rest = spec.partition("=")
    if not sep:
        raise SystemExit(f"generalisation: error: --set expects NAME=DIR[@LIST], got {spec!r}")
    folder, _, split = rest.partition("@")
    return make_set(name, Path(folder), split or None)


def score(spec: str, test: TestSet, limit: int | None) -> dict[str, float]:
    """Mean F1@0.5 and AJI of one model on one set, its parameter count and ms per image."""
    segmenter = load_segmenter(spec)
    stems = test.stems[:limit] if limit else test.stems
    rows, seconds = [], 0.0
    for stem in stems:
        image = read_tiff(test.folder / "images" / f"{stem}.tif")
        labels = read_tiff(test.folder / "labels" / f"{stem}.tif").astype(np.int64)
        start = time.perf_counter()
        result = segment_any(segmenter, image)
        seconds += time.perf_counter() - start
        rows.append(evaluate(labels, result.labels.astype(np.int64)))
    mean = mean_metrics(rows)
    return {"params": segmenter.parameters, "ms": 1000 * seconds / len(stems), "f1": mean["f1@0.5"],
            "aji": mean["aji"], "images": len(stems)}


def main() -> int:
    """Score every model on every set, print the table and write it to the results file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="folder holding the standard test sets")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=DIR[@LIST]", help="an extra test set")
    parser.add_argument("--model", action="append", default=None, help="model spec (default: classical, teacher, student)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the networks (0 = one per idle CPU)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images of each set (quick check)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args()
    configure_threads(args.threads)
    provenance = header()
    print(provenance + "\n", flush=True)
    sets = (standard_sets(args.data) if args.data else []) + [parse_set(s) for s in args.set]
    if not sets:
        parser.error("give --data and/or --set")
    models = args.model or ["classical", "teacher", "student"]
    lines = ["| test set | model | parameters | ms per image | F1@0.5 | AJI |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for test in sets:
        for spec in models:
            r = score(spec, test, args.limit)
            line = f"| {test.name} ({r['images']}) | {spec} | {r['params']:,} | {r['ms']:.0f} | {r['f1']:.3f} | {r['aji']:.3f} |"
            lines.append(line)
            print(line, flush=True)
    intro = [
        "# Generalisation: default settings on each test set",
        "",
        provenance,
        "",
        f"Threads: {args.threads or 'one per idle CPU'}; {time.strftime('%Y-%m-%d')}. F1@0.5 and AJI are per-image means; "
        "ms per image is the wall clock of the whole segmentation (input rules, network, decoding), mean over the set.",
        "",
    ]
    write_results(args.out, "\n".join(intro + lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
