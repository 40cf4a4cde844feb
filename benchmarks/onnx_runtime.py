"""torch vs onnxruntime on CPU for the bundled networks: network time per image and whether the labels agree.

Both back-ends run the same prepared image through the library's inference (padding, tiling, native grid),
then the same decoder (the model's tuned settings) turns each output into labels. Network ms is the
median over the images after one warm-up image, as wall clock and as CPU time of the process (all
threads): on a machine shared with other jobs the wall clock also counts waiting for a core, the CPU
time does not. The runs of the two back-ends alternate image by image so that load hits both alike;
the load average before and after the run is printed.

    python benchmarks/onnx_runtime.py [--data DIR] [--val-images 10] [--threads 1 2] [--repeat 3]

DIR is the folder laid out by ``graphkd data`` (its bbbc039/val/images and labels); without it only
the three bundled samples are used.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from napari_graphkd.data import read_tiff
from napari_graphkd.decode.policy import decode_output
from napari_graphkd.inference import NetworkOutput, tiled_network, working_image
from napari_graphkd.metrics import evaluate
from napari_graphkd.models.onnx import OnnxNetwork
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import load_segmenter
from provenance import bbbc039, header


def load_images(data: str | None, n_val: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, labels): the bundled samples, then the first ``n_val`` BBBC039 val images of ``data``."""
    images = [(name, *load_sample(name)) for name in SAMPLE_NAMES]
    if data:
        folder = bbbc039(data) / "val"
        for path in sorted((folder / "images").glob("*.tif"))[:n_val]:
            images.append((path.stem, read_tiff(path), read_tiff(folder / "labels" / path.name).astype(np.int64)))
    return images


def timed_output(network, prepared: np.ndarray, stride: int) -> tuple[NetworkOutput, float, float]:
    """The library's network output of a prepared image, and the wall-clock and process CPU seconds the network took."""
    start, cpu = time.perf_counter(), time.process_time()
    emb, fg = tiled_network(network, prepared)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return NetworkOutput(emb, fg, prepared.shape, 1.0, seconds, stride=stride), seconds, cpu_seconds


def compare(spec: str, images: list, threads: int, repeat: int) -> dict:
    """Median network ms per back-end, label agreement and the largest output difference, for one model and thread count."""
    torch.set_num_threads(threads)
    segmenter = load_segmenter(spec)
    torch_net, onnx_net = segmenter.model, OnnxNetwork(segmenter.model, threads=threads)
    stride = segmenter.model.config.stem_stride
    prepared = [working_image(image, invert=segmenter.invert) for _, image, _ in images]
    for net in (torch_net, onnx_net):
        tiled_network(net, prepared[0])  # warm-up
    times = {"torch": [], "onnx": []}
    cpu = {"torch": [], "onnx": []}
    identical, max_diff, f1 = 0, 0.0, {"torch": [], "onnx": []}
    differing_pixels = []
    for (name, _, gt), image in zip(images, prepared):
        outputs = {}
        for _ in range(repeat):
            for backend, net in (("torch", torch_net), ("onnx", onnx_net)):
                outputs[backend], seconds, cpu_seconds = timed_output(net, image, stride)
                times[backend].append(seconds)
                cpu[backend].append(cpu_seconds)
        labels = {b: decode_output(o, segmenter.decode_settings)[0] for b, o in outputs.items()}
        max_diff = max(max_diff, float(np.abs(outputs["torch"].embedding - outputs["onnx"].embedding).max()))
        same = np.array_equal(labels["torch"], labels["onnx"])
        identical += same
        if not same:
            differing_pixels.append((name, int((labels["torch"] != labels["onnx"]).sum())))
        for b in labels:
            f1[b].append(evaluate(gt, labels[b])["f1@0.5"])
    return {"torch_ms": 1000 * statistics.median(times["torch"]), "onnx_ms": 1000 * statistics.median(times["onnx"]),
            "torch_cpu": 1000 * statistics.median(cpu["torch"]), "onnx_cpu": 1000 * statistics.median(cpu["onnx"]),
            "identical": identical, "n": len(images), "max_diff": max_diff, "differing": differing_pixels,
            "f1_torch": float(np.mean(f1["torch"])), "f1_onnx": float(np.mean(f1["onnx"]))}


def main() -> int:
    """Print the comparison table (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="folder laid out by `graphkd data` (default: bundled samples only)")
    parser.add_argument("--val-images", type=int, default=10, help="how many BBBC039 val images to add")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="network runs per image and back-end")
    parser.add_argument("--models", nargs="+", default=["student", "teacher"])
    args = parser.parse_args()
    images = load_images(args.data, args.val_images)
    print(header() + "\n")
    print(f"{len(images)} images ({', '.join(n for n, _, _ in images[:3])}{' + BBBC039 val' if len(images) > 3 else ''}), "
          f"median network ms per image over {args.repeat} runs each; torch {torch.__version__}\n")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores)\n")
    print("| model | threads | torch ms | onnxruntime ms | onnx / torch | torch CPU ms | onnxruntime CPU ms | onnx / torch (CPU) "
          "| labels identical | max embedding diff | F1@0.5 torch / onnx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for spec in args.models:
        for threads in args.threads:
            r = compare(spec, images, threads, args.repeat)
            print(f"| {spec} | {threads} | {r['torch_ms']:.1f} | {r['onnx_ms']:.1f} | {r['onnx_ms'] / r['torch_ms']:.2f} | "
                  f"{r['torch_cpu']:.1f} | {r['onnx_cpu']:.1f} | {r['onnx_cpu'] / r['torch_cpu']:.2f} | "
                  f"{'yes' if r['identical'] == r['n'] else 'no'} ({r['identical']}/{r['n']}) | {r['max_diff']:.1e} | "
                  f"{r['f1_torch']:.4f} / {r['f1_onnx']:.4f} |", flush=True)
            notes += [f"{spec}, {threads} threads: {name} differs in {px} px" for name, px in r["differing"]]
    for note in notes:
        print(f"\n- {note}", end="")
    print(f"\n\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
