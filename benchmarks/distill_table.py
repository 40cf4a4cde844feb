"""Does distillation help? Student rows (no-KD, baselines, GRD, ablations) against teacher and classical.

Honest-benchmark rules (docs/method.md, "Benchmark protocol"): one teacher; every student row has the same architecture,
data, augmentation and schedule (ablations: a stated shorter schedule); the rows that carry the
claim (no-KD, GRD intra+inter) run with 3 seeds; every baseline gets a weight sweep at the short
schedule on the tune split (0.1x, 1x, 10x its published weight, one decade further if the best is
at an end); every row is scored at its last checkpoint (no checkpoint selection), with decoder
settings chosen on the tune split (10 train images never used for gradient steps) by the pooled
selection score (napari_graphkd.evaluation.selection_score), and only val is reported. Resumable:
every training run resumes from its folder and every finished row is cached as JSON, so the table
can be built over several invocations.

    python benchmarks/distill_table.py --teacher src/napari_graphkd/weights/teacher-bbbc039.safetensors \
        --data DATA --runs RUNS                                      # all rows (hours on 2 cores)
    python benchmarks/distill_table.py ... --only grd_s0 noKD_s0     # some runs only
    python benchmarks/distill_table.py ... --report                  # table from cached rows only
    python benchmarks/distill_table.py ... --rescore                 # re-evaluate every cached row (machine idle)
    python benchmarks/distill_table.py ... --memory                  # peak training memory, one fresh process per row

Rows may be trained by several processes at once (``--only`` with disjoint keys, ``--threads 1``);
their scores do not depend on the load, their times do. The committed table is therefore made by
``--rescore`` once no training runs: it re-tunes each row's decoder on the tune split, scores and
times val again with the current code, so every row is measured by the same decoder and clock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from provenance import bbbc039, command_line, header, tune_folder, write_results, write_row

from napari_graphkd.data import AugmentConfig, load_folder
from napari_graphkd.decode.mws import DecodeSettings
from napari_graphkd.distill import BASELINE_WEIGHTS, DistillWeights, method_weights
from napari_graphkd.evaluation import DECODE_GRID, network_outputs, score_model, tune_decoder
from napari_graphkd.io.checkpoint import load_checkpoint, read_metadata
from napari_graphkd.metrics import evaluate, mean_metrics
from napari_graphkd.segment import AS_TRAINED, ClassicalSegmenter, ModelSegmenter, RunSettings, segment_any
from napari_graphkd.train.distill import DistillSettings, distill_student
from napari_graphkd.train.loop import TrainSettings

STUDENT = "halfres-student"
# Students decode on the half-resolution grid (their own): scores the same as full-resolution decoding
# on the tune split and val for the bundled student, at a quarter of the decode time.
STUDENT_GRID = dict(DECODE_GRID, resolution=("half",))
SWEEP_FACTORS = (0.1, 1.0, 10.0)
PROBE_STEPS = 20  # steps of the fresh-process run that measures a row's peak training memory
ABLATIONS = ("node", "edge", "affinity", "inter_affinity", "inter_edge")
COLUMNS = ("f1@0.5", "aji", "pq", "sbd")
SHORT_PREFIX = "ablation (short)"  # rows on the short schedule; their gap is measured against the short no-KD row


@dataclass(frozen=True)
class Run:
    """One training run: a method with its weights, a seed and a schedule."""

    key: str
    method: str
    weights: DistillWeights
    seed: int
    steps: int


def plan(full: int, short: int, baseline_weights: dict[str, float]) -> dict[str, list[Run]]:
    """Rows of the table (each a list of seeds) and the sweep/ablation runs, keyed by group."""
    grd = method_weights("grd")
    rows: dict[str, list[Run]] = {
        "student, no distillation": [Run(f"noKD_s{s}", "none", method_weights("none"), s, full) for s in (0, 1, 2)],
    }
    for name, weight in baseline_weights.items():
        rows[f"student + {name}"] = [Run(f"{name}_s0", name, replace(method_weights("none"), **{name: weight}), 0, full)]
    rows["student + GRD intra-image"] = [Run("grd-intra_s0", "grd-intra", method_weights("grd-intra"), 0, full)]
    rows["student + GRD intra+inter"] = [Run(f"grd_s{s}", "grd", grd, s, full) for s in (0, 1, 2)]
    rows[f"{SHORT_PREFIX}: no distillation"] = [Run("short_noKD_s0", "none", method_weights("none"), 0, short)]
    rows[f"{SHORT_PREFIX}: GRD, all terms"] = [Run("short_grd_s0", "grd", grd, 0, short)]
    for term in ABLATIONS:
        rows[f"{SHORT_PREFIX}: GRD without {term}"] = [Run(f"short_no-{term}_s0", "grd", replace(grd, **{term: 0.0}), 0, short)]
    return rows


def sweep_run(name: str, factor: float, short: int) -> Run:
    """Short-schedule run of baseline ``name`` at ``factor`` times its published default weight."""
    return Run(f"sweep_{name}_x{factor:g}", name, replace(method_weights("none"), **{name: BASELINE_WEIGHTS[name] * factor}), 0, short)


def sweep(name: str, short: int, result) -> tuple[list[dict], float | None]:
    """Sweep of one baseline around its default; extended one decade outward if the best is at an end.

    Returns the sweep's results and the chosen weight (None until the sweep is complete).
    """
    results = [result(sweep_run(name, f, short)) for f in SWEEP_FACTORS]
    if not all(results):
        return results, None
    best = max(range(len(results)), key=lambda i: results[i]["tune"]["score"])
    if best in (0, len(results) - 1):
        factor = SWEEP_FACTORS[best] * (0.1 if best == 0 else 10.0)
        results.insert(0 if best == 0 else len(results), result(sweep_run(name, factor, short)))
        if not all(results):
            return results, None
    return results, max(results, key=lambda r: r["tune"]["score"])["weights"][name]


def train_run(run: Run, args, run_dir: Path | None = None) -> Path:
    """Train (or resume) one run (in ``runs/KEY`` unless ``run_dir`` is given); returns its folder."""
    run_dir = run_dir or Path(args.runs) / run.key
    settings = TrainSettings(steps=run.steps, batch_size=4, lr=2e-3, seed=run.seed, validate_every=max(250, run.steps // 6),
                             snapshot_every=10**9, augment=AugmentConfig(crop=256))
    distill = DistillSettings(method=run.method, weights=run.weights)
    def factory(tune):
        return lambda model: score_model(model, tune)

    start = time.time()
    torch.set_num_threads(args.threads)
    distill_student(args.teacher, bbbc039(args.data) / "train", run_dir, STUDENT, settings, distill, validate_factory=factory,
                    command=command_line(),
                    targets_dir=Path(args.runs) / "teacher-targets")
    print(f"  {run.key}: trained/resumed in {time.time() - start:.0f} s", flush=True)
    return run_dir


def timed_scores(segmenter, images_labels, threads: int, decode: DecodeSettings | None = None,
                 run: RunSettings = AS_TRAINED) -> dict:
    """Per-image mean metrics, per-image F1/AJI/object counts, mean network and decode ms per image (single process).

    ``run``: the input rules (default: the model's own scale and polarity; ``RunSettings()``: automatic, as ``graphkd segment``).
    """
    torch.set_num_threads(threads)
    rows, net, dec = [], 0.0, 0.0
    for image, labels in images_labels:
        result = segment_any(segmenter, image, **run.kwargs(), decode=decode)
        rows.append(evaluate(labels, result.labels))
        net, dec = net + result.network_seconds, dec + result.decode_seconds
    n = len(images_labels)
    per_image = {k: [r[k] for r in rows] for k in ("f1@0.5", "aji", "n_gt", "n_pred")}
    return {"metrics": mean_metrics(rows), "per_image": per_image, "network_ms": 1000 * net / n, "decode_ms": 1000 * dec / n}


def evaluate_checkpoint(path: Path, tune, val, threads: int) -> dict:
    """Tune the decoder on the tune split, then score (and time) on val."""
    segmenter = ModelSegmenter(path)
    settings, tune_scores, _ = tune_decoder(network_outputs(segmenter.model, tune), tune, base=segmenter.decode_settings,
                                            grid=STUDENT_GRID)
    return {**timed_scores(segmenter, val, threads, settings), "parameters": segmenter.parameters,
            "decode": settings.to_dict(), "tune": tune_scores, "step": segmenter.metadata.get("step")}


def final_checkpoint(run_dir: Path) -> Path:
    """The run's last checkpoint: every row is scored after its full schedule, without checkpoint selection.

    (Selection on the 10-image tune split was decided by its one nucleus-free image, see the table's notes.)
    """
    return run_dir / "last.safetensors"


def row_result(run: Run, args, tune, val) -> dict:
    """Cached result of one run; trains and evaluates it first if selected (``--only``) and not cached."""
    cache = Path(args.results) / "rows" / f"{run.key}.json"
    if cache.exists():
        result = json.loads(cache.read_text())
        if result["weights"] != asdict(run.weights):  # e.g. a sweep that chose another weight since
            raise SystemExit(f"{cache} was made with other term weights than this run; move it and its run folder away")
        return result
    if args.report or (args.only is not None and run.key not in args.only):
        return {}
    last = final_checkpoint(Path(args.runs) / run.key)
    if last.exists() and read_metadata(last)["distillation"]["weights"] != asdict(run.weights):
        raise SystemExit(f"{last.parent} was trained with other term weights than this run; move it away")
    run_dir = train_run(run, args)
    progress = json.loads((run_dir / "progress.json").read_text())
    result = evaluate_checkpoint(final_checkpoint(run_dir), tune, val, args.threads)
    result.update(key=run.key, method=run.method, weights=asdict(run.weights), seed=run.seed, steps=run.steps,
                  peak_train_mb=progress.get("peak_rss_mb"), train_seconds=progress.get("seconds"))
    write_row(cache, result)
    return result


def reference_segmenter(key: str, args) -> ModelSegmenter | ClassicalSegmenter:
    """The classical pipeline or the teacher (with its exported decoder settings)."""
    return ClassicalSegmenter() if key == "classical" else ModelSegmenter(args.teacher)


def reference_rows(args, val) -> dict[str, dict]:
    """Classical and teacher rows (cached)."""
    out = {}
    for key in ("classical", "teacher"):
        path = Path(args.results) / "rows" / f"{key}.json"
        if not path.exists() and not args.report:
            segmenter = reference_segmenter(key, args)
            write_row(path, {**timed_scores(segmenter, val, args.threads), "parameters": segmenter.parameters})
        if path.exists():
            out[key] = json.loads(path.read_text())
    return out


def rescore_rows(args, tune, val) -> None:
    """Re-evaluate every cached row with the current code on an idle machine: decoder re-tuned on tune, val scored and timed."""
    for path in sorted((Path(args.results) / "rows").glob("*.json")):
        result = json.loads(path.read_text())
        before = result["metrics"]
        if path.stem in ("classical", "teacher"):
            result.update(timed_scores(reference_segmenter(path.stem, args), val, args.threads))
        else:
            result.update(evaluate_checkpoint(final_checkpoint(Path(args.runs) / path.stem), tune, val, args.threads))
        result["timed_threads"] = args.threads
        write_row(path, result)
        print(f"  {path.stem}: F1 {before['f1@0.5']:.4f} -> {result['metrics']['f1@0.5']:.4f}, AJI {before['aji']:.4f} -> "
              f"{result['metrics']['aji']:.4f}; network {result['network_ms']:.1f} ms, decode {result['decode_ms']:.1f} ms", flush=True)


def probe_memory(key: str, args) -> float:
    """Peak RSS (MB) of this process after training ``PROBE_STEPS`` steps of a cached row's run from scratch."""
    row = json.loads((Path(args.results) / "rows" / f"{key}.json").read_text())
    run = Run(key, row["method"], DistillWeights(**row["weights"]), row["seed"], PROBE_STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = train_run(run, args, Path(tmp) / key)
        return json.loads((run_dir / "progress.json").read_text())["peak_rss_mb"]


def measure_memory(args) -> None:
    """Peak training memory of every cached table row (or those in ``--only``), each in a fresh process.

    (A process's peak never goes down, so rows trained one after another in one process cannot be compared.)
    """
    for path in sorted((Path(args.results) / "rows").glob("*.json")):
        if path.stem.startswith("sweep_") or path.stem in ("classical", "teacher") or (args.only and path.stem not in args.only):
            continue
        command = [sys.executable, __file__, "--teacher", args.teacher, "--data", args.data, "--runs", args.runs,
                   "--results", args.results, "--threads", str(args.threads), "--probe", path.stem]
        peak = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
        result = json.loads(path.read_text())
        result.update(peak_train_mb=peak, peak_train_probe_steps=PROBE_STEPS)
        write_row(path, result)
        print(f"  {path.stem}: peak training memory {peak:.0f} MB", flush=True)


def fmt(values: list[float], digits: int = 3) -> str:
    """Mean, or mean ± std over seeds."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: dict[str, list[dict]], refs: dict[str, dict]) -> str:
    """Markdown table with gap recovered on F1 and AJI relative to the no-KD mean of the same schedule."""
    nokd = {False: [r for r in rows.get("student, no distillation", []) if r],
            True: [r for r in rows.get(f"{SHORT_PREFIX}: no distillation", []) if r]}
    teacher = refs.get("teacher")

    def gap(metric: str, results: list[dict], short: bool) -> str:
        if not nokd[short] or not teacher or not results:
            return "–"
        base = statistics.mean(r["metrics"][metric] for r in nokd[short])
        span = teacher["metrics"][metric] - base
        return fmt([100 * (r["metrics"][metric] - base) / span for r in results], 0) + " %" if span > 0 else "–"

    head = ("| row | seeds | params | network ms | decode ms | F1@0.5 | AJI | PQ | SBD | gap F1 | gap AJI | peak train MB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for key in ("classical", "teacher"):
        if key in refs:
            r = refs[key]
            lines.append(f"| {key} | – | {r['parameters']:,} | {r['network_ms']:.0f} | {r['decode_ms']:.0f} | "
                         + " | ".join(f"{r['metrics'][c]:.3f}" for c in COLUMNS) + " | – | – | – |")
    for name, results in rows.items():
        results, short = [r for r in results if r], name.startswith(SHORT_PREFIX)
        if not results:
            lines.append(f"| {name} | 0 | | | | | | | | | | (not run yet) |")
            continue
        lines.append(
            f"| {name} | {len(results)} | {results[0]['parameters']:,} | {fmt([r['network_ms'] for r in results], 0)} | "
            f"{fmt([r['decode_ms'] for r in results], 0)} | "
            + " | ".join(fmt([r["metrics"][c] for r in results]) for c in COLUMNS)
            + f" | {gap('f1@0.5', results, short)} | {gap('aji', results, short)} | {fmt([r['peak_train_mb'] for r in results], 0)} |"
        )
    return head + "\n".join(lines) + "\n"


def nucleus_free_table(rows: dict[str, list[dict]], refs: dict[str, dict]) -> str:
    """F1/AJI over the val images that hold nuclei, and objects predicted on the nucleus-free one.

    A per-image mean scores an image without nuclei 1 or 0 (anything predicted), so that one val
    image moves the mean F1 by 1/50: this table shows the rows without it.
    """
    lines = ["| row | seeds | F1@0.5, images with nuclei | AJI, images with nuclei | objects on the nucleus-free image |",
             "|---|---|---|---|---|"]

    def with_nuclei(scored: list[dict], metric: str) -> list[float]:
        return [statistics.mean(v for v, n in zip(r["per_image"][metric], r["per_image"]["n_gt"]) if n > 0) for r in scored]

    for name, results in [(k, [v]) for k, v in refs.items()] + list(rows.items()):
        results = [r for r in results if r and "per_image" in r]
        if results:
            empty = [sum(p for p, n in zip(r["per_image"]["n_pred"], r["per_image"]["n_gt"]) if n == 0) for r in results]
            lines.append(f"| {name} | {len(results)} | {fmt(with_nuclei(results, 'f1@0.5'))} | {fmt(with_nuclei(results, 'aji'))} | "
                         f"{', '.join(str(int(e)) for e in empty)} |")
    return "\n".join(lines) + "\n"


def sweep_table(sweeps: dict[str, list[dict]]) -> str:
    """Appendix: the baseline weight sweep on the tune split (short schedule), chosen by the selection score.

    The per-image mean F1/AJI columns include the nucleus-free tune image (1 or 0), the score does not depend on it.
    """
    lines = ["| baseline | weight | tune selection score | tune F1@0.5 (per-image mean) | tune AJI (per-image mean) |",
             "|---|---|---|---|---|"]
    for name, results in sweeps.items():
        for r in results:
            if r:
                lines.append(f"| {name} | {r['weights'][name]:g} | {r['tune']['score']:.3f} | {r['tune']['f1@0.5']:.3f} | "
                             f"{r['tune']['aji']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run (or resume) every row, then write benchmarks/results/distill_table.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, help="the folder laid out by `graphkd data` (its bbbc039/ is used)")
    parser.add_argument("--runs", required=True, help="folder of the training runs (one sub-folder per row; resumable)")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=2000, help="schedule of every full student row")
    parser.add_argument("--short-steps", type=int, default=600, help="schedule of sweeps and ablations")
    parser.add_argument("--threads", type=int, default=2, help="threads for timing (the committed table uses 2)")
    parser.add_argument("--only", nargs="*", default=None, help="run keys to train (default: all)")
    parser.add_argument("--report", action="store_true", help="only assemble the table from cached rows")
    parser.add_argument("--rescore", action="store_true", help="re-evaluate and re-time every cached row, then assemble the table")
    parser.add_argument("--memory", action="store_true", help="measure every cached row's peak training memory in a fresh process")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # one row's memory probe (used by --memory)
    args = parser.parse_args()
    if args.probe:
        print(probe_memory(args.probe, args))
        return 0
    args.report = args.report or args.rescore or args.memory

    tune_names = load_checkpoint(args.teacher)[1]["training_data"]["tune_images"]
    folder = bbbc039(args.data)
    tune = load_folder(tune_folder(folder), names=tune_names)
    val_samples = load_folder(folder / "val")
    import tifffile

    val = [(tifffile.imread(folder / "val" / "images" / f"{s.name}.tif"), s.labels) for s in val_samples]

    if args.rescore:
        rescore_rows(args, tune, val)
    if args.memory:
        measure_memory(args)
    sweeps, best_weights, waiting, notes = {}, {}, set(), []
    for name in BASELINE_WEIGHTS:
        sweeps[name], best_weights[name] = sweep(name, args.short_steps, lambda run: row_result(run, args, tune, val))
        cached = Path(args.results) / "rows" / f"{name}_s0.json"
        trained = json.loads(cached.read_text())["weights"][name] if cached.exists() else None
        if best_weights[name] is None and trained is None:  # its full row must not train before the sweep has chosen
            best_weights[name], waiting = BASELINE_WEIGHTS[name], waiting | {f"{name}_s0"}
        elif trained is not None and trained != best_weights[name]:  # re-scored sweeps may prefer another weight
            prefers = "an unfinished extension of its range" if best_weights[name] is None else f"weight {best_weights[name]:g}"
            notes.append(f"- {name}: its sweep, re-scored with the final selection score, now asks for {prefers}; the "
                         f"full row was trained with {trained:g} (chosen by the earlier score) and was not re-run.\n")
            best_weights[name] = trained
    refs = reference_rows(args, val)
    rows = {name: [row_result(r, args, tune, val) if r.key not in waiting else {} for r in runs]
            for name, runs in plan(args.steps, args.short_steps, best_weights).items()}
    command = (f"python benchmarks/distill_table.py --teacher {args.teacher} --data DATA --runs RUNS "
               f"--steps {args.steps} --short-steps {args.short_steps}")
    text = (f"# Does distillation help? (BBBC039 val, 50 images)\n\n{header()}\n\nMade by `{command}` (trains every missing row, "
            f"resuming row by row; `--only KEY...` trains some rows, so several processes can share the work), then "
            f"`{command} --rescore` with nothing else running (every row re-evaluated and timed by the same code) and "
            f"`{command} --memory` (peak training memory, one fresh process per row, {PROBE_STEPS} steps).\n\n"
            f"Full schedule {args.steps} steps, ablations and sweeps {args.short_steps} steps (batch 4, crop 256, AdamW 2e-3 "
            f"cosine). Student: `{STUDENT}`. Every row is scored at its last checkpoint, decoder settings chosen on the tune "
            f"split. Times: per 520x696 image, {args.threads} threads. Gap = share of the teacher - no-KD gap recovered, against the no-KD row of the same schedule.\n\n"
            + table(rows, refs) + "\n## Without the nucleus-free val image\n\n" + nucleus_free_table(rows, refs)
            + ("\nNotes:\n\n" + "".join(notes) if notes else "")
            + "\n## Appendix: baseline weight sweep (tune split, short schedule)\n\nEach baseline takes the weight with the "
              "highest selection score (F1 pooled over all objects + mean AJI over images with objects). The per-image "
              "means include the nucleus-free tune image, scored 1 or 0, which some short-schedule students still "
              "fill with false objects.\n\n" + sweep_table(sweeps))
    write_results(Path(args.results) / "distill_table.md", text)
    print(text)
    return 0



if __name__ == "__main__":
    sys.exit(main())
