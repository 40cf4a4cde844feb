"""Student and teacher end to end on a busy machine: per-image times idle and with one competing busy process.

Each (policy, model) runs in a fresh process that loads the images, segments one warm-up image,
then segments every image twice, idle and with one spinning Python process (not pinned) running,
as another program or the viewer would. The spinner is paused (SIGSTOP) for the idle pass and
resumed (SIGCONT) for the busy one, so both passes of an image see the same background load.
Before each image the thread policy is applied again (``configure_threads``, as the widgets do
per job), so the default policy may choose other threads when busy.

Policies: the package default (``--threads``, 0 = one per idle usable CPU; passive OpenMP waits;
see src/napari_graphkd/runtime.py) and, with ``--compare-spinning``, what the package ran before
it: libgomp's default spinning wait and one thread per CPU, whatever the load.

Prints a markdown table and the ratios: student/teacher time idle and busy, and each model's
slowdown when busy (Linux/macOS: the spinner is paused with signals).

    python benchmarks/load_table.py --images DATA/bbbc039/val/images --limit 10 --compare-spinning
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("student", "teacher")
SPIN = "while True: pass"
CONDITIONS = ("idle", "busy")


def worker(args: argparse.Namespace) -> int:
    """Time one model on the images, idle and busy in turn; print one JSON line."""
    import numpy as np

    from napari_graphkd.data import read_tiff
    from napari_graphkd.runtime import configure_threads
    from napari_graphkd.segment import load_segmenter, segment_any

    files = sorted(Path(args.images).glob("*.tif"))[: args.limit]
    images = [read_tiff(f) for f in files]
    segmenter = load_segmenter(args.worker)
    configure_threads(args.threads)
    segment_any(segmenter, images[0])  # warm-up: first-call allocations, oneDNN kernels
    times = {c: {"network": [], "decode": [], "total": [], "threads": []} for c in CONDITIONS}
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        for _ in range(args.repeat):
            for image in images:
                for condition in CONDITIONS:
                    spinner.send_signal(signal.SIGCONT if condition == "busy" else signal.SIGSTOP)
                    time.sleep(0.2)
                    times[condition]["threads"].append(configure_threads(args.threads))
                    start = time.perf_counter()
                    result = segment_any(segmenter, image)
                    times[condition]["total"].append(time.perf_counter() - start)
                    times[condition]["network"].append(result.network_seconds)
                    times[condition]["decode"].append(result.decode_seconds)
    finally:
        spinner.kill()
        spinner.wait()
    out = {c: {k: (float(np.mean(v)) if k == "threads" else 1000 * float(np.mean(v))) for k, v in t.items()}
           for c, t in times.items()}
    print(json.dumps({"images": len(images), **out}))
    return 0


def run_model(model: str, args: argparse.Namespace, spinning: bool) -> dict:
    """One model's timings from a fresh process (each gets its own OpenMP start-up)."""
    env = dict(os.environ)
    if spinning:  # libgomp reads an empty value as unset (its default spinning wait); the package keeps a set value
        from napari_graphkd.runtime import usable_cpus

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


def table(rows: dict[str, dict], policy: str) -> list[str]:
    """Markdown rows of one policy."""
    lines = []
    for model in MODELS:
        r = rows[model]
        for condition, label in (("idle", "idle"), ("busy", "one busy process")):
            c = r[condition]
            slowdown = f"{r['busy']['total'] / r['idle']['total']:.2f}x" if condition == "busy" else ""
            lines.append(f"| {policy} | {model} | {c['threads']:.1f} | {label} | {c['network']:.0f} | "
                         f"{c['decode']:.0f} | {c['total']:.0f} | {slowdown} |")
    return lines


def ratios(rows: dict[str, dict], policy: str) -> str:
    """Student/teacher per condition and each model's slowdown."""
    parts = [f"student/teacher {c}: {100 * rows['student'][c]['total'] / rows['teacher'][c]['total']:.1f} %" for c in CONDITIONS]
    parts += [f"{m} slowdown busy/idle: {rows[m]['busy']['total'] / rows[m]['idle']['total']:.2f}x" for m in MODELS]
    return f"{policy}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of TIFF images (e.g. BBBC039 val/images)")
    p.add_argument("--limit", type=int, default=10, help="first N images (sorted by name)")
    p.add_argument("--repeat", type=int, default=1, help="passes over the images")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = the package default: one per idle usable CPU)")
    p.add_argument("--compare-spinning", action="store_true", help="also run the previous policy (spinning, all CPUs)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if not any(Path(args.images).glob("*.tif")):
        print(f"no .tif images in {args.images}", file=sys.stderr)
        return 2
    policies = [("passive, idle CPUs (default)", False)]
    policies += [("spinning, all CPUs (before)", True)] if args.compare_spinning else []
    results = []
    for name, spinning in policies:
        rows = {}
        for model in MODELS:
            rows[model] = run_model(model, args, spinning)
            print(f"  {name} {model}: {rows[model]}", file=sys.stderr, flush=True)
        results.append((name, rows))
    print(f"{args.limit} images of {args.images}, {args.repeat} pass(es), mean ms per image, {os.cpu_count()} CPUs, "
          "end to end (segment_any: preparation, network, decoding); threads = mean chosen per image\n")
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
