"""Chunked segmentation at scale, on mosaics of real BBBC039 val images (DATA: the folder laid out by `graphkd data`).

(a) agreement: a rows x cols mosaic of val images (5 x 5 = 2600 x 3480 px) segmented whole and in
    chunks; matched F1@0.5 between the two, and both scored against the mosaic's ground truth.
(b) scale: a mosaic of at least --size x --size px written as Zarr, segmented by ``graphkd segment``
    in a child process with 1 and 2 local Dask workers; peak memory is the summed RSS of the whole
    process tree (command, scheduler, workers), sampled every 0.1 s; throughput in megapixels/s of
    the whole command (cluster start, statistics, segmentation, stitching, writing).

    python benchmarks/scale_mosaic.py --data DATA [--model student] [--size 16384] [--workers 1 2]
        [--chunk 1024] [--skip-agreement] [--skip-scale] [--out benchmarks/results/scale.md]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from provenance import bbbc039, header, write_results

from napari_graphkd.data import read_tiff


def image_pairs(data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, labels) of every image in ``data/images`` with its ``data/labels`` twin, sorted by name."""
    paths = sorted((data / "images").glob("*.tif"))
    if not paths:
        raise SystemExit(f"no images in {data / 'images'}")
    return [(read_tiff(p), read_tiff(data / "labels" / p.name).astype(np.int64)) for p in paths]


def tile_at(pairs: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-th mosaic tile: images in turn, flipped on every pass so repeated tiles differ."""
    image, labels = pairs[k % len(pairs)]
    flips = (k // len(pairs)) % 4
    sl = (slice(None, None, -1 if flips & 1 else 1), slice(None, None, -1 if flips & 2 else 1))
    return image[sl], labels[sl]


def mosaic(pairs: list, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and ground-truth mosaic (ids made unique across tiles)."""
    tiles = [[tile_at(pairs, r * cols + c) for c in range(cols)] for r in range(rows)]
    image = np.block([[t[0] for t in row] for row in tiles])
    offset, label_rows = 0, []
    for row in tiles:
        parts = []
        for _, lab in row:
            parts.append(np.where(lab > 0, lab + offset, 0))
            offset += int(lab.max(initial=0))
        label_rows.append(parts)
    return image, np.block(label_rows)


def agreement(pairs: list, model: str, rows: int, cols: int, chunk: int) -> dict:
    """(a): whole-image vs chunked labels of a mosaic, and both against its ground truth."""
    from napari_graphkd.large import LabelsTarget, from_array, run_to_end, segment_large
    from napari_graphkd.metrics import evaluate, f1_at
    from napari_graphkd.segment import load_segmenter, segment_any
    import zarr

    image, truth = mosaic(pairs, rows, cols)
    start = time.perf_counter()
    whole = segment_any(load_segmenter(model), image).labels
    whole_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        target = LabelsTarget(str(Path(tmp) / "labels.zarr"))
        start = time.perf_counter()
        run_to_end(segment_large(from_array(image), target, model, chunk=chunk, workers=1))
        chunked_s = time.perf_counter() - start
        chunked = zarr.open_array(target.path, mode="r")[:]
    return {"shape": image.shape, "agree_f1": f1_at(whole, chunked), "pixels_differ": float(np.mean((whole > 0) != (chunked > 0))),
            "whole": evaluate(truth, whole), "chunked": evaluate(truth, chunked), "whole_s": whole_s, "chunked_s": chunked_s,
            "n_whole": int(len(np.unique(whole)) - 1), "n_chunked": int(len(np.unique(chunked)) - 1)}


def write_zarr_mosaic(pairs: list, size: int, path: Path, chunk: int) -> tuple[int, int]:
    """A mosaic of at least size x size px written band by band as a Zarr array (never whole in memory)."""
    import zarr

    h, w = pairs[0][0].shape
    rows, cols = -(-size // h), -(-size // w)
    array = zarr.create_array(str(path), shape=(rows * h, cols * w), chunks=(chunk, chunk), dtype=pairs[0][0].dtype)
    for r in range(rows):
        array[r * h : (r + 1) * h] = np.concatenate([tile_at(pairs, r * cols + c)[0] for c in range(cols)], axis=1)
    return array.shape


class TreeMemory:
    """Peak summed RSS of a process and all its descendants, sampled on a thread."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self.root, self.every, self.peak, self._stop = psutil.Process(pid), every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self.thread.join()
        return self.peak


def scale_run(zarr_path: Path, out: Path, model: str, workers: int, chunk: int, threads: int) -> dict:
    """(b): one ``graphkd segment`` run in a child process; wall time, peak tree memory, objects."""
    cmd = [sys.executable, "-m", "napari_graphkd.cli", "segment", str(zarr_path), "--out", str(out), "--model", model,
           "--workers", str(workers), "--chunk", str(chunk), "--threads", str(threads)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(child.pid)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - start
    peak = memory.stop()
    if child.returncode != 0:
        raise SystemExit(f"run failed ({child.returncode}): {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    return {"workers": workers, "seconds": seconds, "peak_gb": peak / 1e9, "line": stdout.strip().splitlines()[-1],
            "load": (load_before + os.getloadavg()[0]) / 2}


def scale_table(rows: list[dict], shape: tuple[int, int], chunk: int, threads: int) -> list[str]:
    """Markdown lines of (b): one row per worker count, the measured scaling and the extrapolation."""
    mpx = shape[0] * shape[1] / 1e6
    part = [f"## (b) {shape[0]} x {shape[1]} px mosaic ({mpx:.0f} Mpx) as Zarr, chunks of {chunk} px, "
            f"{threads} torch thread per worker", "",
            "| workers | wall s | Mpx/s | peak memory (process tree) | load average during the run |", "|---|---|---|---|---|"]
    part += [f"| {r['workers']} | {r['seconds']:.1f} | {mpx / r['seconds']:.2f} | {r['peak_gb']:.2f} GB | {r['load']:.1f} |"
             for r in rows]
    ordered = sorted((r for r in rows if r["workers"] > 0), key=lambda r: r["workers"])  # 0 = no cluster
    if len(ordered) > 1:
        base, best = ordered[0], ordered[-1]
        speedup = base["seconds"] / best["seconds"]
        efficiency = speedup / (best["workers"] / base["workers"])
        part += ["", f"Scaling from {base['workers']} to {best['workers']} workers: {speedup:.2f}x ({100 * efficiency:.0f} % "
                 f"efficiency). Extrapolation, not a measurement: the chunks are independent until the stitching (a small "
                 f"share of the time), so N workers on N free cores would give about N x {mpx / base['seconds']:.2f} Mpx/s "
                 f"x that efficiency."]
    part += ["", f"Last line of the command: `{rows[-1]['line']}`", ""]
    return part


def main() -> int:
    """Run (a) and (b), print the tables and write them to --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the folder laid out by `graphkd data` (its bbbc039/val is used)")
    parser.add_argument("--model", default="student")
    parser.add_argument("--grid", type=int, nargs=2, default=(5, 5), metavar=("ROWS", "COLS"), help="(a) mosaic tiles")
    parser.add_argument("--agreement-chunk", type=int, default=512, help="(a) chunk size")
    parser.add_argument("--size", type=int, default=16384, help="(b) mosaic side at least this many px")
    parser.add_argument("--chunk", type=int, default=1024, help="(b) chunk size")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="(b) local worker counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/scale.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    pairs = image_pairs(bbbc039(args.data) / "val")
    lines = [f"# Chunked segmentation at scale ({args.model})", "",
             header(), ""]
    if not args.skip_agreement:
        a = agreement(pairs, args.model, *args.grid, args.agreement_chunk)
        lines += [f"## (a) {args.grid[0]} x {args.grid[1]} mosaic of {len(pairs)} images ({a['shape'][0]} x {a['shape'][1]} px), "
                  f"chunks of {args.agreement_chunk} px", "",
                  f"Chunked vs whole-image labels: matched F1@0.5 = {a['agree_f1']:.4f}, objects {a['n_chunked']} vs "
                  f"{a['n_whole']}, foreground pixels differing: {100 * a['pixels_differ']:.3f} %", "",
                  "| labels | F1@0.5 | AJI | PQ | objects | seconds |", "|---|---|---|---|---|---|"]
        for name in ("whole", "chunked"):
            m = a[name]
            lines.append(f"| {name} | {m['f1@0.5']:.4f} | {m['aji']:.4f} | {m['pq']:.4f} | {a['n_' + name]} | {a[name + '_s']:.1f} |")
        lines.append("")
        print("\n".join(lines), flush=True)
    if not args.skip_scale:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mosaic.zarr"
            shape = write_zarr_mosaic(pairs, args.size, path, args.chunk)
            rows = []
            for n in args.workers:  # the table is rewritten after every run, so a long benchmark leaves partial results
                rows.append(scale_run(path, Path(tmp) / f"labels_{n}.zarr", args.model, n, args.chunk, args.threads))
                part = scale_table(rows, shape, args.chunk, args.threads)
                print("\n".join(part), flush=True)
                write_results(args.out, "\n".join(lines + part))
        lines += part
    write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
