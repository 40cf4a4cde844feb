"""Score and time the fragment pre-merge of the mutex-watershed decoder for the bundled models (tune and val).

The decoder pre-merges support pixels whose nearest-neighbour weight exceeds FRAGMENT_ATTRACTION,
and background pixels, into fragments, then runs the mutex watershed on the fragment graph. This
prints, per attraction value, each bundled model's tune selection score, val F1/AJI and median
decode time; the row "pixels" turns both pre-merges off (the pixel-level mutex watershed of the
same support), so the value is chosen on tune against it.

    python benchmarks/decoder_fragments.py --data DATA [--threads 2]     # DATA: laid out by `graphkd data`
"""
from __future__ import annotations

import statistics
from functools import partial

import napari_graphkd.decode.mws as mws
from bundled_outputs import bundled_outputs, decoder_benchmark_args
from napari_graphkd.evaluation import score_outputs
from napari_graphkd.decode.policy import decode_output

ATTRACTIONS = (None, 0.9, 0.95, 0.98)  # None: no pre-merge at all (pixel-level graph)


def fragment_decoder(attraction: float | None):
    """The fragment decoder with this pre-merge (None: every support pixel is its own fragment)."""
    original = mws.fragment_mutex_watershed
    if attraction is None:
        return lambda aff, fg, bias, stride, randomized, _threshold: original(
            aff, fg, bias, stride, randomized, foreground_threshold=float("-inf"), attraction=float("inf"))
    return partial(original, attraction=attraction)


def main() -> int:
    """Print one markdown row per (model, attraction)."""
    args = decoder_benchmark_args(__doc__)
    original = mws.fragment_mutex_watershed
    print("| model | pre-merge attraction | tune score | val F1@0.5 | val AJI | val PQ | decode ms (val median) |")
    print("|---|---|---|---|---|---|---|")
    for name, segmenter, (tune, tune_out), (val, val_out) in bundled_outputs(args.data):
        settings = segmenter.decode_settings
        for attraction in ATTRACTIONS:
            mws.fragment_mutex_watershed = fragment_decoder(attraction)
            try:
                tune_scores = score_outputs(tune_out, tune, settings)
                val_scores = score_outputs(val_out, val, settings)
                ms = 1000 * statistics.median(decode_output(o, settings)[1] for o in val_out)
            finally:
                mws.fragment_mutex_watershed = original
            label = "pixels" if attraction is None else attraction
            print(f"| {name} | {label} | {tune_scores['score']:.4f} | {val_scores['f1@0.5']:.4f} | "
                  f"{val_scores['aji']:.4f} | {val_scores['pq']:.4f} | {ms:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
