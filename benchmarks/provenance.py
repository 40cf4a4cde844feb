"""Where a benchmark result comes from: package version, git commit, command line; where its data lies; how it is written.

Every benchmark prints :func:`header` first (and writes it at the top of any result file), so a
table can always be traced to the code and the command that made it. Folder arguments (``--data``,
``--runs``, ...) are shown as placeholders (``DATA``, ``RUNS``): result files name no machine.
Result files and cached rows are written by :func:`write_results` and :func:`write_row` (atomic).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import napari_graphkd

REPO = Path(__file__).resolve().parents[1]
# Folder options and the placeholder each is written as in a recorded command line.
PLACEHOLDERS = {"--data": "DATA", "--runs": "RUNS", "--images": "IMAGES", "--results": "RESULTS", "--out": "OUT"}


def git_commit() -> str:
    """Short commit of the checkout this runs from, ``+changes`` when it has uncommitted edits; ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, relative to the repository, with folder arguments replaced by placeholders."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    words = ["python", str(script.relative_to(REPO)) if REPO in script.parents else script.name]
    rest = iter(argv[1:])
    for word in rest:
        option, eq, value = word.partition("=")
        if option in PLACEHOLDERS:
            words.append(f"{option}={PLACEHOLDERS[option]}" if eq else option)
            if not eq:
                next(rest, None)
                words.append(PLACEHOLDERS[option])
        else:
            words.append(word)
    return shlex.join(words)


def header(argv: list[str] | None = None) -> str:
    """One markdown line: package version, git commit and command line."""
    return (f"napari-graphkd {napari_graphkd.__version__}, commit {git_commit()}; command: `{command_line(argv)}` "
            f"(DATA = the folder laid out by `graphkd data`)")


def bbbc039(data: str | Path) -> Path:
    """The BBBC039 folder of a data folder laid out by ``graphkd data`` (or ``data`` itself if it is that folder)."""
    data = Path(data)
    folder = data / "bbbc039" if (data / "bbbc039").is_dir() else data
    if not (folder / "val").is_dir():
        raise SystemExit(f"no bbbc039/val under {data}: lay the data out with `graphkd data DATA` and pass --data DATA")
    return folder


def tune_folder(bbbc039_folder: Path) -> Path:
    """Where the tune images lie: ``tune/`` of the layout, else ``train/`` (tune images listed in a checkpoint)."""
    return bbbc039_folder / "tune" if (bbbc039_folder / "tune").is_dir() else bbbc039_folder / "train"


def write_results(path: str | Path, text: str) -> Path:
    """Write a result file atomically (temporary file beside it, then os.replace; parent folders created), so a killed
    or concurrent run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_row(path: str | Path, row: dict) -> Path:
    """Cache one finished result row as JSON (read back with ``json.loads``), atomically."""
    return write_results(path, json.dumps(row, indent=1))
