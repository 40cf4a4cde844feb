"""CPU time per image of the bundled teacher, the bundled student and the classical pipeline.

Run with nothing else on the machine (no training): times are wall-clock per 520x696 image,
network and decode separately, median over the images after one warm-up image.

    python benchmarks/speed_table.py [--data DATA | --images DIR] [--threads 2] [--repeat 1]

DATA is the folder laid out by ``graphkd data`` (its 50 BBBC039 val images are timed); without it,
the bundled samples.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from provenance import bbbc039, header

from napari_graphkd.data import read_tiff
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import AS_TRAINED, load_segmenter, segment_any


def load_images(folder: str | None) -> list:
    """Images of a folder, or the bundled samples."""
    if folder is None:
        return [load_sample(name)[0] for name in SAMPLE_NAMES]
    return [read_tiff(p) for p in sorted(Path(folder).glob("*.tif"))]


def time_model(spec: str, images: list, repeat: int) -> dict:
    """Median network, decode and total seconds per image (first image is a warm-up)."""
    segmenter = load_segmenter(spec)
    segment_any(segmenter, images[0], **AS_TRAINED.kwargs())
    net, dec = [], []
    for _ in range(repeat):
        for image in images:
            result = segment_any(segmenter, image, **AS_TRAINED.kwargs())
            net.append(result.network_seconds)
            dec.append(result.decode_seconds)
    total = [n + d for n, d in zip(net, dec)]
    return {"params": segmenter.parameters, "net": statistics.median(net), "dec": statistics.median(dec),
            "total": statistics.median(total)}


def main() -> int:
    """Print the speed table (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="the folder laid out by `graphkd data` (times bbbc039/val)")
    parser.add_argument("--images", default=None, help="folder of TIFFs (default: the bundled samples)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = load_images(str(bbbc039(args.data) / "val" / "images") if args.data else args.images)
    rows = {spec: time_model(spec, images, args.repeat) for spec in ("teacher", "student", "classical")}
    teacher = rows["teacher"]
    print(header() + "\n")
    print(f"{len(images)} images, {args.threads} threads, median per image\n")
    print("| model | parameters | network ms | decode ms | total ms | params vs teacher | time vs teacher |")
    print("|---|---|---|---|---|---|---|")
    for spec, r in rows.items():
        share = f"{100 * r['params'] / teacher['params']:.2f} %" if r["params"] else "–"
        print(f"| {spec} | {r['params']:,} | {1000 * r['net']:.0f} | {1000 * r['dec']:.0f} | {1000 * r['total']:.0f} | "
              f"{share} | {100 * r['total'] / teacher['total']:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
