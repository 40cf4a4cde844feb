"""Student and teacher end to end on a busy machine: per-image times idle and with one competing busy process.

Each (model, condition) runs in a fresh process with the package's thread policy (``--threads``,
0 = one per idle usable CPU; passive OpenMP waits, see src/napari_graphkd/runtime.py): load the
images, one warm-up image, then ``segment_any`` on every image, timed. "busy" starts one
spinning Python process (not pinned) for the whole run, as another program or the viewer would.
Prints a markdown table and the ratios: student/teacher time idle and busy, and each model's
slowdown when busy. ``--compare-spinning`` adds the same runs as the package ran before this
policy: libgomp's default spinning wait and one thread per CPU, whatever the load.

    python benchmarks/load_table.py --images DATA/bbbc039/val/images --limit 10
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from napari_graphkd.runtime import usable_cpus

MODELS = ("student", "teacher")
SPIN = "while True: pass"


def worker(args: argparse.Namespace) -> int:
    """Time one model on the images in this process; print one JSON line."""
    import numpy as np

    from napari_graphkd.data import read_tiff
    from napari_graphkd.runtime import configure_threads
    from napari_graphkd.segment import load_segmenter, segment_any

    threads = configure_threads(args.threads)
    files = sorted(Path(args.images).glob("*.tif"))[: args.limit]
    images = [read_tiff(f) for f in files]
    segmenter = load_segmenter(args.worker)
    segment_any(segmenter, images[0])  # warm-up: first-call allocations, oneDNN kernels
    net, dec, wall = [], [], []
    for _ in range(args.repeat):
        for image in images:
            start = time.perf_counter()
            result = segment_any(segmenter, image)
            wall.append(time.perf_counter() - start)
            net.append(result.network_seconds)
            dec.append(result.decode_seconds)
    ms = lambda v: 1000 * float(np.mean(v))  # noqa: E731
    print(json.dumps({"images": len(images), "threads": threads, "network_ms": ms(net), "decode_ms": ms(dec),
                      "total_ms": ms(wall), "wait_policy": os.environ.get("OMP_WAIT_POLICY")}))
    return 0


def run_model(model: str, args: argparse.Namespace, spinning: bool) -> dict:
    """One model's timings from a fresh process (so each gets its own OpenMP start-up)."""
    env = dict(os.environ)
    if spinning:  # libgomp reads an empty value as unset (its default spinning wait); the package keeps a set value
        env["OMP_WAIT_POLICY"] = ""
        threads = str(usable_cpus())  # torch's default: every CPU
    else:
        env.pop("OMP_WAIT_POLICY", None)
        threads = str(args.threads)
    cmd = [sys.executable, __file__, "--worker", model, "--images", args.images, "--limit", str(args.limit),
           "--repeat", str(args.repeat), "--threads", threads]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {model} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, spinning: bool) -> dict[tuple[str, str], dict]:
    """Timings per (model, condition)."""
    rows = {}
    for condition in ("idle", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", SPIN]) if condition == "busy" else None
        time.sleep(1.0 if busy else 0.0)  # the competitor is running before the model starts
        try:
            for model in MODELS:
                rows[model, condition] = run_model(model, args, spinning)
                print(f"  {model} {condition}: {rows[model, condition]}", file=sys.stderr, flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    return rows


def table(rows: dict[tuple[str, str], dict], policy: str) -> list[str]:
    """Markdown rows of one wait policy, then its ratios."""
    lines = []
    for model in MODELS:
        idle, busy = rows[model, "idle"], rows[model, "busy"]
        for condition, r in (("idle", idle), ("one busy process", busy)):
            slowdown = f"{busy['total_ms'] / idle['total_ms']:.2f}x" if r is busy else ""
            lines.append(f"| {policy} | {model} | {r['threads']} | {condition} | {r['network_ms']:.0f} | "
                         f"{r['decode_ms']:.0f} | {r['total_ms']:.0f} | {slowdown} |")
    return lines


def ratios(rows: dict[tuple[str, str], dict], policy: str) -> str:
    """Student/teacher per condition and each model's slowdown."""
    parts = [f"student/teacher {c}: {100 * rows['student', c]['total_ms'] / rows['teacher', c]['total_ms']:.1f} %"
             for c in ("idle", "busy")]
    parts += [f"{m} slowdown busy/idle: {rows[m, 'busy']['total_ms'] / rows[m, 'idle']['total_ms']:.2f}x" for m in MODELS]
    return f"{policy}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of TIFF images (e.g. BBBC039 val/images)")
    p.add_argument("--limit", type=int, default=10, help="first N images (sorted by name)")
    p.add_argument("--repeat", type=int, default=1, help="passes over the images")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = the package default: one per idle usable CPU)")
    p.add_argument("--compare-spinning", action="store_true", help="also run with libgomp's default spinning wait")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if not any(Path(args.images).glob("*.tif")):
        print(f"no .tif images in {args.images}", file=sys.stderr)
        return 2
    policies = [("passive, idle CPUs (package default)", False)]
    policies += [("spinning, all CPUs (before)", True)] if args.compare_spinning else []
    results = [(name, measure(args, spinning)) for name, spinning in policies]
    print(f"{args.limit} images of {args.images}, {args.repeat} pass(es), mean ms per image, "
          f"{os.cpu_count()} CPUs, end to end (segment_any: preparation, network, decoding)\n")
    print("| policy | model | threads | machine | network ms | decode ms | total ms | slowdown |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results:
        print("\n".join(table(rows, name)))
    print()
    for name, rows in results:
        print(ratios(rows, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
