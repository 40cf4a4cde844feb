"""Generalisation table: classical / teacher / student (or any model specs) on each annotated test set.

Every model runs with its default settings, as ``graphkd segment`` does for a new user. Per set and
model: parameters, milliseconds per image (wall clock of the whole segmentation, mean over the
set), F1@0.5 and AJI (per-image means). Prints a markdown table and writes it, with the package
provenance line (version, git commit, command), to benchmarks/results/generalisation.md.

    python benchmarks/generalisation.py --data DATA [--model teacher --model student ...] [--set NAME=DIR[@LIST]]

``--data DATA`` uses the standard test sets found under DATA: BBBC039 val (``bbbc039/val``), the
DSB2018 fluorescence val split (the images of ``dsb2018_fluo_val.txt`` in ``dsb2018_fluo`` or
``dsb2018_fluo/val``) and the DSB2018 bright-field val split (the 8 whole 1024 x 1024 images of
``dsb2018_brightfield_val.txt``, those the example's crops are cut from). ``--set`` adds any folder with images/ and labels/, optionally limited to
the stems of a split list (a bundled split name such as ``dsb2018_fluo_val``, or a .txt file).

``--brightfield [DIR]`` (default DIR: the bright-field example's shipped crops) adds the
bright-field test crops: every ``--model`` before fine-tuning, then the library's default
fine-tuning (the example's path: ``plan_finetune`` + ``run_finetune`` on the crops of DIR/train,
from the bundled ``teacher`` and ``student``) once per ``--seeds`` seed, and the fine-tuned teacher
and student. Each seed's result is cached as JSON under ``--rows`` and reused by a later run with
the same data, settings and bundled weights. Bright-field rows are scored twice: with the automatic
rules (as ``graphkd segment --model NEW.safetensors`` runs the new checkpoints) and with the
painted cells' diameter and inverted input (as the Segment widget runs them after fine-tuning).

``--merge`` keeps the rows (and their command lines) of the sets this run does not score from the
existing ``--out`` file, so one set can be added or re-run without re-running the others.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from provenance import REPO, header, write_results, write_row

from napari_graphkd.data import SPLIT_DIR, read_split, read_tiff
from napari_graphkd.metrics import evaluate, mean_metrics
from napari_graphkd.runtime import configure_threads
from napari_graphkd.segment import bundled_path, load_segmenter, segment_any
from napari_graphkd.train.finetune import FinetuneSettings, plan_finetune

sys.path.insert(0, str(REPO / "examples"))
from finetune_brightfield import DATA as BRIGHTFIELD  # noqa: E402  (the example's crops and its fine-tuning path)
from finetune_brightfield import run_timed, training_crops  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "generalisation.md"
ROWS = Path(__file__).parent / "results" / "generalisation_rows"
BRIGHTFIELD_SET = "bright-field test crops"
SEEDS = (0, 1, 2)
TABLE_HEAD = ["| test set | model | parameters | ms per image | F1@0.5 | AJI |", "|---|---|---|---|---|---|"]
# name, candidate folders under --data, split list selecting the images
STANDARD_SETS = [
    ("BBBC039 val", ("bbbc039/val", "bbbc039_val"), "bbbc039_val"),
    ("DSB2018 fluorescence val", ("dsb2018_fluo/val", "dsb2018_fluo_val", "dsb2018_fluo"), "dsb2018_fluo_val"),
    ("DSB2018 bright-field val, whole images", ("dsb2018_brightfield",), "dsb2018_brightfield_val"),
]


@dataclass(frozen=True)
class TestSet:
    """Annotated images to score on: a folder with images/ and labels/ and the stems to use."""

    name: str
    folder: Path
    stems: tuple[str, ...]


def list_stems(split: str | None) -> set[str] | None:
    """Stems of a split list: a .txt path or a bundled split name; None for no list."""
    if split is None:
        return None
    path = Path(split) if split.endswith(".txt") else SPLIT_DIR / f"{split}.txt"
    return set(read_split(path))


def make_set(name: str, folder: Path, split: str | None) -> TestSet:
    """The folder's images, limited to those in the split list when one is given."""
    images = sorted(p.stem for p in (folder / "images").glob("*.tif*"))
    wanted = list_stems(split)
    stems = [s for s in images if wanted is None or s in wanted]
    if not stems:
        raise SystemExit(f"generalisation: error: no images of {name} in {folder / 'images'}")
    return TestSet(name, folder, tuple(stems))


def standard_sets(root: Path) -> list[TestSet]:
    """The standard test sets found under ``root`` (a set whose folder is absent is skipped, with a note)."""
    found = []
    for name, candidates, split in STANDARD_SETS:
        folder = next((root / c for c in candidates if (root / c / "images").is_dir()), None)
        if folder is None:
            print(f"note: {name} not found under {root} (looked for {', '.join(candidates)})", file=sys.stderr)
            continue
        found.append(make_set(name, folder, split))
    return found


def parse_set(spec: str) -> TestSet:
    """``NAME=DIR`` or ``NAME=DIR@LIST``."""
    name, sep, rest = spec.partition("=")
    if not sep:
        raise SystemExit(f"generalisation: error: --set expects NAME=DIR[@LIST], got {spec!r}")
    folder, _, split = rest.partition("@")
    return make_set(name, Path(folder), split or None)


def score(spec: str, test: TestSet, limit: int | None = None, **inputs) -> dict[str, float]:
    """Mean F1@0.5 and AJI of one model on one set, its parameter count and ms per image.

    ``inputs`` (diameter, invert, channel) go to ``segment_any``; none given: the automatic rules.
    """
    segmenter = load_segmenter(spec)
    stems = test.stems[:limit] if limit else test.stems
    rows, seconds = [], 0.0
    for stem in stems:
        image = read_tiff(test.folder / "images" / f"{stem}.tif")
        labels = read_tiff(test.folder / "labels" / f"{stem}.tif").astype(np.int64)
        start = time.perf_counter()
        result = segment_any(segmenter, image, **inputs)
        seconds += time.perf_counter() - start
        rows.append(evaluate(labels, result.labels.astype(np.int64)))
    mean = mean_metrics(rows)
    return {"params": segmenter.parameters, "ms": 1000 * seconds / len(stems), "f1": mean["f1@0.5"],
            "aji": mean["aji"], "images": len(stems)}


def table_line(name: str, spec: str, r: dict, note: str = "") -> str:
    """One table row of a model's scores on a set (``note``: how it was run, after the image count)."""
    return f"| {name} ({r['images']}){note} | {spec} | {r['params']:,} | {r['ms']:.0f} | {r['f1']:.3f} | {r['aji']:.3f} |"


def painted_inputs(diameter: float) -> dict:
    """The Segment widget's inputs after fine-tuning: the painted cells' diameter, inverted gray input."""
    return {"diameter": diameter, "invert": True, "channel": "luminance"}


def file_digest(path: Path) -> str:
    """First 16 hex digits of a file's SHA-256 (which bundled weights a cached row used)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def finetune_seed(seed: int, data: Path, test: TestSet, rows: Path) -> dict:
    """One seed of the default fine-tuning on ``data/train`` and the new models' scores on ``test`` (cached)."""
    settings = FinetuneSettings(seed=seed)  # the defaults: polarity detected on the crops (dark nuclei: inverted)
    teacher, student = bundled_path("teacher"), bundled_path("student")
    ident = {"data": data.resolve().name, "settings": asdict(settings),
             "weights": {"teacher": file_digest(teacher), "student": file_digest(student)}}
    cache = rows / f"brightfield_seed{seed}.json"
    if cache.is_file():
        row = json.loads(cache.read_text())
        if all(row.get(k) == v for k, v in ident.items()):
            print(f"seed {seed}: cached in {cache.name}", file=sys.stderr)
            return row
    plan = plan_finetune(training_crops(data), settings, teacher, student)
    out = Path(tempfile.mkdtemp(prefix="graphkd-generalisation-"))
    try:
        load = os.getloadavg()[0]
        result, seconds, cpu = run_timed(plan, out)
        scores = {role: {"auto": score(str(path), test), "painted": score(str(path), test, **painted_inputs(plan.diameter))}
                  for role, path in result.saved.items()}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    row = dict(ident, seed=seed, header=header(), seconds=seconds, cpu_seconds=cpu, threads=torch.get_num_threads(),
               load=load, diameter=plan.diameter, scores=scores)
    write_row(cache, row)
    print(f"seed {seed}: fine-tuning {seconds:.0f} s ({cpu:.0f} CPU s); student F1 {scores['student']['auto']['f1']:.3f} "
          f"(automatic), {scores['student']['painted']['f1']:.3f} (painted diameter)", file=sys.stderr, flush=True)
    return row


def spread(values: list[float]) -> str:
    """``mean ± sample std`` over seeds (the mean alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def seed_lines(seeds: list[dict], rule: str, note: str) -> list[str]:
    """Table rows of the fine-tuned teacher and student: mean ± std over seeds of one scoring rule (auto, painted)."""
    lines = []
    for role in ("teacher", "student"):
        runs = [s["scores"][role][rule] for s in seeds if role in s["scores"]]
        if runs:
            lines.append(f"| {BRIGHTFIELD_SET} ({runs[0]['images']}){note}, after fine-tuning ({len(runs)} seeds) | "
                         f"{role} fine-tuned | {runs[0]['params']:,} | {np.mean([r['ms'] for r in runs]):.0f} | "
                         f"{spread([r['f1'] for r in runs])} | {spread([r['aji'] for r in runs])} |")
    return lines


def brightfield_lines(before: dict[str, dict], painted_before: dict[str, dict], seeds: list[dict]) -> list[str]:
    """The bright-field rows: every model before and the fine-tuned pair after, first with the automatic rules,
    then with the painted cells' diameter (``before``/``painted_before``: model spec -> scores)."""
    painted = f", painted diameter {seeds[0]['diameter']:.1f} px, inverted"
    lines = [table_line(BRIGHTFIELD_SET, spec, r, ", before") for spec, r in before.items()]
    lines += seed_lines(seeds, "auto", "")
    lines += [table_line(BRIGHTFIELD_SET, spec, r, f"{painted}, before") for spec, r in painted_before.items()]
    return lines + seed_lines(seeds, "painted", painted)


def seed_section(seeds: list[dict]) -> list[str]:
    """Per-seed table: fine-tuning seconds (wall, CPU), threads, load, F1 / AJI of the new models by scoring rule."""
    cell = lambda s, role, rule: f"{s['scores'][role][rule]['f1']:.3f} / {s['scores'][role][rule]['aji']:.3f}"  # noqa: E731
    lines = [f"## {BRIGHTFIELD_SET}: fine-tuning per seed", "",
             "`run_finetune` wall-clock and CPU seconds (scoring before, training, re-tuning, saving), the torch threads and "
             "the machine's load average when it started; F1@0.5 / AJI of the new models on the test crops.", "",
             "| seed | fine-tune s | CPU s | threads | load | teacher (automatic) | student (automatic) "
             "| teacher (painted diameter) | student (painted diameter) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        lines.append(f"| {s['seed']} | {s['seconds']:.0f} | {s['cpu_seconds']:.0f} | {s['threads']} | {s['load']:.1f} | "
                     f"{cell(s, 'teacher', 'auto')} | {cell(s, 'student', 'auto')} | {cell(s, 'teacher', 'painted')} | "
                     f"{cell(s, 'student', 'painted')} |")
    return lines


def row_set(line: str) -> str:
    """The test set a table row belongs to (its first cell up to the image count)."""
    return line.strip("| ").split(" (", 1)[0].split(",", 1)[0]


def read_previous(path: Path) -> tuple[dict[str, str], dict[str, list[str]], dict[str, list[str]]]:
    """From an existing results file: provenance text by set, table rows by set, extra sections by set."""
    provenance: dict[str, str] = {}
    rows: dict[str, list[str]] = {}
    sections: dict[str, list[str]] = {}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"Rows of (.+?): (napari-graphkd .*)$", line):
            for name in match.group(1).split("; "):
                provenance[name] = match.group(2)
        elif line.startswith("## "):
            section = line[3:].split(":", 1)[0]
            sections[section] = [line]
        elif section is not None:
            sections[section].append(line)
        elif line.startswith("| ") and line not in TABLE_HEAD:
            rows.setdefault(row_set(line), []).append(line)
    return provenance, rows, {k: v[:-1] if v and not v[-1] else v for k, v in sections.items()}


def assemble(provenance: dict[str, str], rows: dict[str, list[str]], sections: dict[str, list[str]]) -> str:
    """The results file: which command made which rows, the table, then the per-set sections."""
    by_line: dict[str, list[str]] = {}
    for name, text in provenance.items():
        by_line.setdefault(text, []).append(name)
    intro = ["# Generalisation: default settings on each test set", ""]
    intro += [f"Rows of {'; '.join(names)}: {text}" for text, names in by_line.items()] + [""]
    intro += ["F1@0.5 and AJI are per-image means; ms per image is the wall clock of the whole segmentation (input rules, "
              "network, decoding), mean over the set. Every model runs with its default settings (`segment_any` with the "
              "automatic size, polarity and channel rules), as `graphkd segment` runs a user's image."]
    if BRIGHTFIELD_SET in rows:
        intro[-1] += (f" On the {BRIGHTFIELD_SET} the 'after' rows are the bundled `teacher` and `student` after the "
                      "library's default fine-tuning (`graphkd finetune`, the Fine-tune widget) on the bright-field "
                      "example's training crops, mean ± sample std over seeds; the first block scores them with the "
                      "automatic rules (`graphkd segment --model NEW.safetensors`), the second with the painted cells' "
                      "diameter and inverted input (what the Segment widget uses after fine-tuning), with the models "
                      "before fine-tuning scored the same way for comparison.")
    intro.append("")
    table = TABLE_HEAD + [line for lines in rows.values() for line in lines]
    extra = [line for lines in sections.values() for line in ["", *lines]]
    return "\n".join(intro + table + extra) + "\n"


def main() -> int:
    """Score every model on every set, print the table and write it to the results file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="folder holding the standard test sets")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=DIR[@LIST]", help="an extra test set")
    parser.add_argument("--brightfield", type=Path, nargs="?", const=BRIGHTFIELD, default=None, metavar="DIR",
                        help="add the bright-field fine-tune rows (DIR/{train,test}; default: the example's crops)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="fine-tuning seeds (--brightfield)")
    parser.add_argument("--rows", type=Path, default=ROWS, help="folder of the cached per-seed fine-tuning results")
    parser.add_argument("--model", action="append", default=None, help="model spec (default: classical, teacher, student)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the networks (0 = one per idle CPU)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images of each set (quick check)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of the sets not scored here from --out")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    provenance = header()
    print(provenance + "\n", flush=True)
    sets = (standard_sets(args.data) if args.data else []) + [parse_set(s) for s in args.set]
    if not sets and args.brightfield is None:
        parser.error("give --data, --set and/or --brightfield")
    models = args.model or ["classical", "teacher", "student"]
    done = f"{provenance}; threads {args.threads or f'{threads} (one per idle CPU)'}, {time.strftime('%Y-%m-%d')}."
    prov, rows, sections = read_previous(args.out) if args.merge and args.out.is_file() else ({}, {}, {})
    print("\n".join(TABLE_HEAD), flush=True)
    for test in sets:
        rows[test.name] = []
        for spec in models:
            rows[test.name].append(table_line(test.name, spec, score(spec, test, args.limit)))
            print(rows[test.name][-1], flush=True)
        prov[test.name] = done
    if args.brightfield is not None:
        test = make_set(BRIGHTFIELD_SET, args.brightfield / "test", None)
        seeds = [finetune_seed(seed, args.brightfield, test, args.rows) for seed in args.seeds]
        before = {spec: score(spec, test) for spec in models}
        painted = {spec: score(spec, test, **painted_inputs(seeds[0]["diameter"])) for spec in models}
        rows[BRIGHTFIELD_SET] = brightfield_lines(before, painted, seeds)
        sections[BRIGHTFIELD_SET] = seed_section(seeds)
        prov[BRIGHTFIELD_SET] = done
        print("\n".join(rows[BRIGHTFIELD_SET] + [""] + sections[BRIGHTFIELD_SET]), flush=True)
    write_results(args.out, assemble(prov, rows, sections))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
