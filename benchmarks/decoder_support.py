"""Score and time the regional decoder's support constants for the bundled models (tune and val).

The regional mutex watershed only decodes pixels near a foreground probability >= SUPPORT_THRESHOLD
(dilated by SUPPORT_MARGIN grid px). Tighter support is faster; this prints, per pair, each bundled
model's tune selection score, val F1/AJI and decode time, so the constants are chosen on tune.

    python benchmarks/decoder_support.py --data ../shared/data/bbbc039 [--threads 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import napari_graphkd.decode.mws as mws
from napari_graphkd.data import load_folder
from napari_graphkd.evaluation import network_outputs, score_outputs
from napari_graphkd.inference import decode_output
from napari_graphkd.segment import load_segmenter

PAIRS = ((0.02, 3), (0.05, 2), (0.1, 2), (0.1, 1), (0.2, 1), (0.3, 1))


def main() -> int:
    """Print one markdown row per (model, threshold, margin)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with train/ and val/")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    val = load_folder(Path(args.data) / "val")
    print("| model | threshold | margin | tune score | val F1@0.5 | val AJI | decode ms (val) |")
    print("|---|---|---|---|---|---|---|")
    for name in ("teacher", "student"):
        segmenter = load_segmenter(name)
        tune = load_folder(Path(args.data) / "train", names=segmenter.metadata["training_data"]["tune_images"])
        tune_out, val_out = network_outputs(segmenter.model, tune), network_outputs(segmenter.model, val)
        for threshold, margin in PAIRS:
            mws.SUPPORT_THRESHOLD, mws.SUPPORT_MARGIN = threshold, margin
            tune_scores = score_outputs(tune_out, tune, segmenter.decode_settings)
            val_scores = score_outputs(val_out, val, segmenter.decode_settings)
            ms = 1000 * sum(decode_output(o, segmenter.decode_settings)[1] for o in val_out) / len(val_out)
            print(f"| {name} | {threshold} | {margin} | {tune_scores['score']:.4f} | {val_scores['f1@0.5']:.4f} | "
                  f"{val_scores['aji']:.4f} | {ms:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
