"""Labels of the bundled teacher, student and classical pipeline on real images, saved or compared.

Run once with ``--save`` before a change to the segmentation code and with ``--compare`` after it:
every label image (plain, rescaled, tiled, inverted RGB, stacks), the fine-tune working images and
the tune-split scores must be identical. Prints one line per case and exits 1 on any difference.

    python benchmarks/labels_unchanged.py --data DATA --save before.npz [--images 10]   # DATA: laid out by `graphkd data`
    python benchmarks/labels_unchanged.py --data DATA --compare before.npz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from provenance import bbbc039, header

from napari_graphkd.data import load_folder, read_tiff
from napari_graphkd.evaluation import score_model
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import AS_TRAINED, load_segmenter, segment_any
from napari_graphkd.train.finetune import AnnotatedImage, FinetuneSettings, plan_finetune
from napari_graphkd.segment import bundled_path


def cases(data: Path, n_images: int) -> dict[str, tuple[np.ndarray, dict]]:
    """Name -> (image, segment keyword arguments) of every case."""
    out: dict[str, tuple[np.ndarray, dict]] = {}
    for name in SAMPLE_NAMES:
        out[f"sample/{name}"] = (load_sample(name)[0], {})
    paths = sorted((data / "val" / "images").glob("*.tif"))[:n_images]
    for path in paths:
        out[f"val/{path.stem}"] = (read_tiff(path), {})
    first = read_tiff(paths[0])
    out["rescaled/d40"] = (first, {"diameter": 40.0})
    out["rescaled/d20-tile256"] = (first, {"diameter": 20.0, "tile": 256})
    rgb = np.stack([first.max() - first] * 3, axis=-1)
    out["rgb-inverted"] = (rgb, {"invert": True})
    out["stack"] = (np.stack([read_tiff(p)[:256, :320] for p in paths[:3]]), {})
    return out


def labels_of(data: Path, n_images: int) -> dict[str, np.ndarray]:
    """Every label image and score of the check, by name."""
    results: dict[str, np.ndarray] = {}
    all_cases = cases(data, n_images)
    for spec in ("teacher", "student", "classical"):
        segmenter = load_segmenter(spec)
        for name, (image, kwargs) in all_cases.items():
            results[f"{spec}/{name}"] = segment_any(segmenter, image, **dict(AS_TRAINED.kwargs(), **kwargs)).labels
            print(f"{spec}/{name}", flush=True)
    val = load_folder(data / "val", names=[p.stem for p in sorted((data / "val" / "images").glob("*.tif"))[:3]])
    for spec in ("teacher", "student"):
        scores = score_model(load_segmenter(spec).model, val)
        results[f"score/{spec}"] = np.array([scores[k] for k in sorted(scores)])
    image, labels = load_sample(SAMPLE_NAMES[0])
    plan = plan_finetune([AnnotatedImage("s", image[:200, :260], labels[:200, :260])], FinetuneSettings(diameter=35.0),
                         bundled_path("teacher"), bundled_path("student"))
    results["finetune/train-image"] = plan.train[0].image
    results["finetune/train-map"] = plan.train[0].labels
    return results


def main() -> int:
    """Save or compare the labels."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the folder laid out by `graphkd data` (its bbbc039/val is used)")
    parser.add_argument("--images", type=int, default=10, help="number of val images")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the labels to this .npz")
    group.add_argument("--compare", help="compare with the labels in this .npz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(header())
    results = labels_of(bbbc039(args.data), args.images)
    if args.save:
        np.savez_compressed(args.save, **results)
        print(f"saved {len(results)} arrays to {args.save}")
        return 0
    before = dict(np.load(args.compare))
    differ = sorted(k for k in set(before) | set(results)
                    if k not in before or k not in results or not np.array_equal(before[k], results[k]))
    print(f"{len(results) - len(differ)} of {len(before)} arrays identical" + (f"; differ: {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
