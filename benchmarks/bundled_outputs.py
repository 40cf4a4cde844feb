"""Shared set-up of the decoder benchmarks: arguments, and each bundled model's network outputs on tune and val."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

import torch

from napari_graphkd.data import Sample, load_folder
from napari_graphkd.evaluation import network_outputs
from napari_graphkd.inference import NetworkOutput
from napari_graphkd.segment import ModelSegmenter, load_segmenter


def decoder_benchmark_args(doc: str) -> argparse.Namespace:
    """``--data`` (folder with train/ and val/) and ``--threads`` (set for torch here)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with train/ and val/")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def bundled_outputs(data: str | Path) -> Iterator[tuple[str, ModelSegmenter, tuple[list[Sample], list[NetworkOutput]],
                                                         tuple[list[Sample], list[NetworkOutput]]]]:
    """Per bundled model (teacher, student): its segmenter, (tune samples, outputs) and (val samples, outputs).

    The tune images are the ones listed in the model's checkpoint; networks run once, decoders many times.
    """
    val = load_folder(Path(data) / "val")
    for name in ("teacher", "student"):
        segmenter = load_segmenter(name)
        tune = load_folder(Path(data) / "train", names=segmenter.metadata["training_data"]["tune_images"])
        yield name, segmenter, (tune, network_outputs(segmenter.model, tune)), (val, network_outputs(segmenter.model, val))
