"""Automatic input rules (nucleus diameter, polarity, channel) against the defaults of before, on data the models never saw.

BBBC039 val is what the bundled models were made for (the automatic rules must not cost there);
the DSB2018 sets are acquisitions they never saw. For each set and model: F1@0.5 / AJI with the old defaults (training diameter, no inversion) and with
``auto`` rules, the polarity detection accuracy, and the diameter estimate against the ground
truth's median nucleus diameter. Per-image means; one thread.

    python benchmarks/input_rules.py --data DATA [--fluo-images 60] [--teacher-images 16]

DATA is the data folder (with bbbc039/val/, dsb2018_fluo/ and dsb2018_brightfield/); writes
benchmarks/results/input_rules.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from provenance import header, write_results

from napari_graphkd.data import Sample, median_diameter, read_tiff
from napari_graphkd.metrics import evaluate, mean_metrics
from napari_graphkd.preprocess import detect_polarity
from napari_graphkd.segment import AS_TRAINED, RunSettings, load_segmenter, segment_any
from napari_graphkd.sizing import typical_diameter

SETS = {"bbbc039/val": False, "dsb2018_fluo": False, "dsb2018_brightfield": True}  # set -> dark nuclei on a bright background
MODELS = ("classical", "student", "teacher")


def run(segmenter, image: np.ndarray, rules: RunSettings):
    """(pipeline result, wall seconds) of one image under ``rules``."""
    start = time.perf_counter()
    result = segment_any(segmenter, image, **rules.kwargs())
    return result, time.perf_counter() - start


def load_set(root: Path, name: str, limit: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, labels) of a set; ``limit`` picks evenly spaced files of the sorted list."""
    files = sorted((root / name / "images").glob("*.tif"))
    if limit and limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return [(f.stem, read_tiff(f), read_tiff(root / name / "labels" / f.name).astype(np.int32)) for f in files]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with bbbc039/val/, dsb2018_fluo/ and dsb2018_brightfield/")
    parser.add_argument("--fluo-images", type=int, default=60)
    parser.add_argument("--teacher-images", type=int, default=16, help="images per set for the (slow) teacher")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "input_rules.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.data)
    before, after = AS_TRAINED, RunSettings()
    print(header(), flush=True)
    lines = ["# Automatic input rules: before (training diameter, no inversion) and after (`auto`)", "", header(), "",
             "One thread, per-image means; s/image is wall time on a shared 2-core machine (indicative only).", ""]
    table = ["| set | model | images | F1@0.5 before | AJI before | F1@0.5 auto | AJI auto | s/image before | s/image auto |",
             "|---|---|---|---|---|---|---|---|---|"]
    detail = ["| set | model | inverted as the set needs | no consistent size (training size used) "
              "| diameter error vs GT typical: median | max | vs GT plain median: median |", "|---|---|---|---|---|---|---|"]
    polarity_rows = []
    for set_name, dark in SETS.items():
        items = load_set(root, set_name, args.fluo_images if set_name == "dsb2018_fluo" else None)
        correct = sum(detect_polarity(image) == dark for _, image, _ in items)
        polarity_rows.append(f"| {set_name} | {len(items)} | {correct}/{len(items)} |")
        print(f"{set_name}: polarity {correct}/{len(items)}", flush=True)
        for spec in args.models:
            segmenter = load_segmenter(spec)
            subset = items[: args.teacher_images] if spec == "teacher" else items
            scores = {"before": [], "auto": []}
            seconds = {"before": 0.0, "auto": 0.0}
            errors, plain_errors, fallbacks, polarity = [], [], 0, 0
            for name, image, gt in subset:
                for key, rules in (("before", before), ("auto", after)):
                    result, sec = run(segmenter, image, rules)
                    scores[key].append(evaluate(gt, result.labels))
                    seconds[key] += sec
                chosen = result.inputs
                fallbacks += chosen.diameter is None
                polarity += chosen.invert == dark
                if gt.any():  # a field without nuclei has no size to compare with
                    used = chosen.diameter or segmenter.train_diameter
                    errors.append(abs(used / typical_diameter(gt) - 1))
                    plain_errors.append(abs(used / median_diameter([Sample(name, image, gt)]) - 1))
            a, b = mean_metrics(scores["before"]), mean_metrics(scores["auto"])
            k = len(subset)
            table.append(f"| {set_name} | {spec} | {k} | {a['f1@0.5']:.3f} | {a['aji']:.3f} | {b['f1@0.5']:.3f} | {b['aji']:.3f} "
                         f"| {seconds['before'] / k:.2f} | {seconds['auto'] / k:.2f} |")
            detail.append(f"| {set_name} | {spec} | {polarity}/{k} | {fallbacks}/{k} | {100 * np.median(errors):.1f} % "
                          f"| {100 * np.max(errors):.1f} % | {100 * np.median(plain_errors):.1f} % |")
            print(table[-1], detail[-1], sep="\n", flush=True)
    lines += table + ["", "Polarity detection (`detect_polarity`, all images of the set):", "",
                      "| set | images | correct |", "|---|---|---|", *polarity_rows, "",
                      "Diameter chosen (the training diameter where no consistent size was found) against the ground truth: "
                      "its typical diameter (area-weighted median equivalent diameter, the statistic the estimate measures) "
                      "and its plain median equivalent diameter; relative error per image:", "",
                      *detail, ""]
    out = write_results(args.out, "\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
