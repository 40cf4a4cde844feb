"""Score and time the decoder's support constants for the bundled models (tune and val).

The mutex watershed only decodes pixels near a foreground probability >= SUPPORT_THRESHOLD
(dilated by SUPPORT_MARGIN grid px). Tighter support is faster; this prints, per pair, each bundled
model's tune selection score, val F1/AJI and decode time, so the constants are chosen on tune.

    python benchmarks/decoder_support.py --data DATA [--threads 2]       # DATA: laid out by `graphkd data`
"""
from __future__ import annotations

import napari_graphkd.decode.mws as mws
from bundled_outputs import bundled_outputs, decoder_benchmark_args
from napari_graphkd.evaluation import score_outputs
from napari_graphkd.decode.policy import decode_output

PAIRS = ((0.02, 3), (0.05, 2), (0.1, 2), (0.1, 1), (0.2, 1), (0.3, 1))


def main() -> int:
    """Print one markdown row per (model, threshold, margin)."""
    args = decoder_benchmark_args(__doc__)
    print("| model | threshold | margin | tune score | val F1@0.5 | val AJI | decode ms (val) |")
    print("|---|---|---|---|---|---|---|")
    for name, segmenter, (tune, tune_out), (val, val_out) in bundled_outputs(args.data):
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
