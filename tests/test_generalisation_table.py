"""The generalisation benchmark's table assembly: bright-field rows over seeds, and --merge keeping other sets' rows."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generalisation  # noqa: E402  (benchmarks/generalisation.py)


def scores(f1: float, aji: float, params: int = 100, ms: float = 10.0) -> dict:
    """One model's scores on the four test crops."""
    return {"params": params, "ms": ms, "f1": f1, "aji": aji, "images": 4}


def seed_row(seed: int, teacher: float, student: float) -> dict:
    """A cached per-seed result: automatic and painted-diameter scores of both fine-tuned models."""
    return {"seed": seed, "diameter": 21.5, "seconds": 100.0 + seed, "cpu_seconds": 90.0, "threads": 1, "load": 2.0,
            "scores": {"teacher": {"auto": scores(teacher, 0.8), "painted": scores(teacher + 0.01, 0.8)},
                       "student": {"auto": scores(student, 0.7), "painted": scores(student + 0.01, 0.7)}}}


def test_brightfield_rows_show_mean_and_sample_std_over_seeds():
    seeds = [seed_row(0, 0.90, 0.80), seed_row(1, 0.92, 0.90), seed_row(2, 0.94, 1.00)]
    before = {"classical": scores(0.1, 0.05, params=0)}
    lines = generalisation.brightfield_lines(before, before, seeds)
    assert lines[0] == "| bright-field test crops (4), before | classical | 0 | 10 | 0.100 | 0.050 |"
    assert lines[1].startswith("| bright-field test crops (4), after fine-tuning (3 seeds) | teacher fine-tuned | 100 | 10 |")
    assert "| 0.920 ± 0.020 | 0.800 ± 0.000 |" in lines[1]
    assert "| 0.900 ± 0.100 |" in lines[2]  # student: 0.8, 0.9, 1.0
    assert lines[3].startswith("| bright-field test crops (4), painted diameter 21.5 px, inverted, before | classical")
    assert "| 0.930 ± 0.020 |" in lines[4]  # painted scores of the teacher
    assert {generalisation.row_set(line) for line in lines} == {generalisation.BRIGHTFIELD_SET}
    section = generalisation.seed_section(seeds)
    assert section[-1] == "| 2 | 102 | 90 | 1 | 2.0 | 0.940 / 0.800 | 1.000 / 0.700 | 0.950 / 0.800 | 1.010 / 0.700 |"


def test_merge_keeps_rows_and_command_of_sets_not_rerun(tmp_path):
    old = {"BBBC039 val": ["| BBBC039 val (50) | student | 22 | 5 | 0.941 | 0.876 |"],
           "DSB2018 fluorescence val": ["| DSB2018 fluorescence val (65) | student | 22 | 5 | 0.765 | 0.632 |"]}
    first = "napari-graphkd 0.2.0, commit aaa; command: `old`; threads 1, 2026-11-29."
    path = tmp_path / "generalisation.md"
    path.write_text(generalisation.assemble(dict.fromkeys(old, first), old, {}))
    provenance, rows, sections = generalisation.read_previous(path)
    assert rows == old and provenance == dict.fromkeys(old, first) and sections == {}
    seeds = [seed_row(0, 0.9, 0.9)]
    rows[generalisation.BRIGHTFIELD_SET] = generalisation.brightfield_lines({}, {}, seeds)
    sections[generalisation.BRIGHTFIELD_SET] = generalisation.seed_section(seeds)
    provenance[generalisation.BRIGHTFIELD_SET] = "napari-graphkd 0.2.0, commit bbb; command: `new`; threads 1, 2026-11-30."
    text = generalisation.assemble(provenance, rows, sections)
    assert f"Rows of BBBC039 val; DSB2018 fluorescence val: {first}" in text
    assert "Rows of bright-field test crops: napari-graphkd 0.2.0, commit bbb" in text
    path.write_text(text)
    assert generalisation.assemble(*generalisation.read_previous(path)) == text  # a second merge changes nothing
