"""Chunked 3D segmentation: agreement with the whole-volume labels, and peak memory on a volume over the in-memory limit.

(a) agreement (with --data): the light-sheet nuclei test slab segmented whole and in 3D chunks
    (several per axis, with the default halo and with a small one); matched F1@0.5 between the
    two, and both scored against the slab's ground truth.
(b) memory: a volume of synthetic nuclei larger than MAX_WORKING_VOXELS (the in-memory limit),
    generated slab by slab into a Zarr array (never whole in memory), segmented by
    ``graphkd segment`` in a child process on threads (``--workers 0``); peak memory is the summed
    RSS of the process tree, sampled every 0.1 s. A smaller volume is run the same way to show that
    the peak follows the chunk, not the volume.

    python benchmarks/volume_chunked.py --model CHECKPOINT_3D [--data DATA] [--shape 72,1024,1024]
        [--small 72,256,256] [--threads 1] [--out benchmarks/results/volume_chunked.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import header, write_results
from scale_mosaic import TreeMemory

NUCLEUS_RADIUS = (9.0, 12.0)  # px: synthetic nuclei about the training diameter (28 px) across
AGREEMENT_GEOMETRIES = {"default halo": ((16, 64, 64), None), "larger halo": ((16, 64, 64), (64, 96, 96)),
                        "small halo": ((16, 64, 64), (4, 8, 8))}


def shape_arg(text: str) -> tuple[int, int, int]:
    """Z,Y,X whole numbers."""
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]


def write_nuclei_zarr(path: Path, shape: tuple[int, int, int], seed: int = 0, slab: int = 8) -> int:
    """Bright ellipsoids on a noisy background written ``slab`` planes at a time into a uint8 Zarr; their number."""
    import zarr

    rng = np.random.default_rng(seed)
    spacing = 2.6 * NUCLEUS_RADIUS[1]
    grid = [np.arange(spacing / 2, n, spacing) for n in shape]
    centres = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 3)
    centres = centres + rng.uniform(-0.2, 0.2, centres.shape) * spacing
    radii = rng.uniform(*NUCLEUS_RADIUS, len(centres))
    array = zarr.create_array(str(path), shape=shape, chunks=(slab, 256, 256), dtype=np.uint8)
    for z0 in range(0, shape[0], slab):
        z1 = min(z0 + slab, shape[0])
        block = 20 + rng.normal(0, 4, (z1 - z0, *shape[1:]))
        for (cz, cy, cx), r in zip(centres, radii):
            if cz + r < z0 or cz - r >= z1:
                continue
            lo = [max(0, int(c - r)) for c in (cy, cx)]
            hi = [min(n, int(c + r) + 2) for c, n in zip((cy, cx), shape[1:])]
            zz, yy, xx = np.ogrid[z0:z1, lo[0] : hi[0], lo[1] : hi[1]]
            r2 = ((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) / r**2
            block[:, lo[0] : hi[0], lo[1] : hi[1]] += np.where(r2 <= 1, 150 - 50 * r2, 0)
        array[z0:z1] = np.clip(block, 0, 255).astype(np.uint8)
    return len(centres)


def agreement(data: str, model: str, threads: int, min_size: int) -> list[str]:
    """(a): whole-volume vs chunked labels of the nuclei test slab, and both against its ground truth."""
    from dataclasses import replace

    import zarr

    from napari_graphkd.io.volumes import load_slab
    from napari_graphkd.large import LabelsTarget, from_array, run_to_end, segment_large
    from napari_graphkd.metrics import evaluate, f1_at
    from napari_graphkd.segment import load_segmenter, segment_any

    slab = load_slab(data, "nuclei3d_lightsheet", "test")
    segmenter = load_segmenter(model)
    decode = replace(segmenter.decode_settings, min_size=min_size)
    start = time.perf_counter()
    whole = segment_any(segmenter, slab.image, voxel_size=slab.voxel_size, diameter=None, invert=False, decode=decode).labels
    rows = [("whole volume", "-", "-", evaluate(slab.labels, whole), len(np.unique(whole)) - 1, 1.0, time.perf_counter() - start)]
    for name, (chunk, halo) in AGREEMENT_GEOMETRIES.items():
        with tempfile.TemporaryDirectory() as tmp:
            target = LabelsTarget(str(Path(tmp) / "labels.zarr"))
            start = time.perf_counter()
            last = run_to_end(segment_large(from_array(slab.image), target, model, chunk=chunk, halo=halo, invert=False,
                                            voxel_size=slab.voxel_size, threads=threads, decode=decode.to_dict()))
            seconds = time.perf_counter() - start
            labels = zarr.open_array(target.path, mode="r")
            halos = labels.attrs["graphkd"]["halo"]
            labels = labels[:]
        rows.append((f"chunked, {name}", "x".join(map(str, chunk)), "x".join(map(str, halos)), evaluate(slab.labels, labels),
                     len(np.unique(labels)) - 1, f1_at(whole, labels), seconds))
        print(name, last, flush=True)
    shape = "x".join(map(str, slab.image.shape))
    lines = [f"## (a) Agreement: nuclei3d_lightsheet test slab ({shape} voxels, {len(np.unique(slab.labels)) - 1} nuclei), "
             f"decoder min_size {min_size}", "",
             "| labels | chunk (z,y,x) | halo (z,y,x) | objects | F1@0.5 vs whole volume | F1@0.5 vs truth | AJI vs truth | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, chunk, halo, scores, n, agree, seconds in rows:
        lines.append(f"| {name} | {chunk} | {halo} | {n} | {agree:.3f} | {scores['f1@0.5']:.3f} | {scores['aji']:.3f} | {seconds:.1f} |")
    return lines + [""]


def memory_run(zarr_path: Path, out: Path, model: str, threads: int) -> dict:
    """One ``graphkd segment`` of a Zarr volume in a child process on threads: wall time, peak tree memory, last line."""
    import subprocess

    cmd = [sys.executable, "-m", "napari_graphkd.cli", "segment", str(zarr_path), "--out", str(out), "--model", model,
           "--workers", "0", "--threads", str(threads), "--invert", "no"]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(child.pid)
    stdout, stderr = child.communicate()
    seconds, peak = time.perf_counter() - start, memory.stop()
    if child.returncode != 0:
        raise SystemExit(f"run failed ({child.returncode}): {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    return {"seconds": seconds, "peak_gb": peak / 1e9, "line": stdout.strip().splitlines()[-1]}


def memory_table(model: str, shapes: list[tuple[int, int, int]], threads: int) -> list[str]:
    """(b): peak memory and time of the chunked path per volume size, against the in-memory limit."""
    from napari_graphkd.inference import MAX_WORKING_VOXELS

    lines = [f"## (b) Memory: synthetic nuclei volumes as Zarr, default 3D chunks, {threads} torch thread", "",
             f"The in-memory path refuses volumes over {MAX_WORKING_VOXELS:,} working voxels (its 16-channel float32 "
             "embedding alone would take 64 bytes per voxel).", "",
             "| volume (z,y,x) | voxels | over the in-memory limit | embedding of the whole volume (estimate) | "
             "chunked: peak memory (process tree) | chunked: wall s | synthetic nuclei | objects found |",
             "|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "volume.zarr"
            nuclei = write_nuclei_zarr(path, shape)
            run = memory_run(path, Path(tmp) / "labels.zarr", model, threads)
        voxels = int(np.prod(shape))
        objects = run["line"].split(":", 1)[1].split("objects")[0].strip()
        lines.append(f"| {'x'.join(map(str, shape))} | {voxels / 1e6:.1f} M | {'yes' if voxels > MAX_WORKING_VOXELS else 'no'} | "
                     f"{64 * voxels / 1e9:.1f} GB | {run['peak_gb']:.2f} GB | {run['seconds']:.0f} | {nuclei} | {objects} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> int:
    """Run (a) when --data is given and (b), print the tables and write them to --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a 3D checkpoint (e.g. a unet3d-student trained with graphkd train)")
    parser.add_argument("--data", default=None, help="the data folder holding nuclei3d_lightsheet/ (for (a))")
    parser.add_argument("--shape", type=shape_arg, default=(72, 1024, 1024), help="(b) volume over the in-memory limit")
    parser.add_argument("--small", type=shape_arg, default=(72, 256, 256), help="(b) a volume under it, for comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--min-size", type=int, default=1000, help="(a) decoder min_size in voxels (the 3D benchmark's choice)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/volume_chunked.md")
    args = parser.parse_args()
    import torch

    from napari_graphkd.segment import load_segmenter

    torch.set_num_threads(args.threads)
    segmenter = load_segmenter(args.model)
    if segmenter.ndim != 3:
        raise SystemExit(f"{args.model} is a 2D model; give a 3D checkpoint")
    argv = [("MODEL" if a == args.model else a) for a in sys.argv]
    lines = ["# Chunked 3D segmentation", "", header(argv), "",
             f"Model: {segmenter.metadata.get('name', 'a 3D checkpoint')} ({segmenter.parameters:,} parameters, "
             f"training voxel size {segmenter.voxel_size or 'isotropic'}). One run each on a shared 2-core machine.", ""]
    if args.data:
        lines += agreement(args.data, args.model, args.threads, args.min_size)
        print("\n".join(lines), flush=True)
    if not args.skip_memory:
        lines += memory_table(args.model, [args.small, args.shape], args.threads)
    write_results(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
