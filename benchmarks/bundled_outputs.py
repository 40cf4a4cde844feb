"""Shared set-up of the decoder benchmarks: arguments, and each bundled model's network outputs on tune and val."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

import torch
from provenance import bbbc039, header, tune_folder

from napari_graphkd.data import Sample, load_folder
from napari_graphkd.evaluation import network_outputs
from napari_graphkd.inference import NetworkOutput
from napari_graphkd.segment import ModelSegmenter, load_segmenter


def decoder_benchmark_args(doc: str) -> argparse.Namespace:
    """``--data`` (the folder laid out by ``graphkd data``) and ``--threads`` (set for torch here); prints the provenance line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the folder laid out by `graphkd data` (its bbbc039/ is used)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(header() + "\n")
    return args


def bundled_outputs(data: str | Path) -> Iterator[tuple[str, ModelSegmenter, tuple[list[Sample], list[NetworkOutput]],
                                                         tuple[list[Sample], list[NetworkOutput]]]]:
    """Per bundled model (teacher, student): its segmenter, (tune samples, outputs) and (val samples, outputs).

    The tune images are the ones listed in the model's checkpoint; networks run once, decoders many times.
    """
    folder = bbbc039(data)
    val = load_folder(folder / "val")
    for name in ("teacher", "student"):
        segmenter = load_segmenter(name)
        tune = load_folder(tune_folder(folder), names=segmenter.metadata["training_data"]["tune_images"])
        yield name, segmenter, (tune, network_outputs(segmenter.model, tune)), (val, network_outputs(segmenter.model, val))
