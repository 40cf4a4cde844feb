"""The graphkd command line, as a user runs it: outputs, tables, one-line errors, no overwrites."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_graphkd.cli import main


@pytest.fixture()
def image_folder(tmp_path, crop):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", crop[0])
    tifffile.imwrite(folder / "b.tif", crop[0][:, ::-1].copy())
    gt = tmp_path / "gt"
    gt.mkdir()
    tifffile.imwrite(gt / "a.tif", crop[1])
    tifffile.imwrite(gt / "b.tif", crop[1][:, ::-1].copy())
    return folder, gt


def test_segment_writes_one_label_image_per_input_and_prints_times(image_folder, tmp_path, capsys):
    images, _ = image_folder
    assert main(["segment", "--model", "classical", "--out", str(tmp_path / "out"), str(images)]) == 0
    out = capsys.readouterr().out
    assert "network ms" in out and "decode ms" in out and "a.tif" in out
    labels = tifffile.imread(tmp_path / "out" / "a.tif")
    assert labels.shape == (160, 200) and np.issubdtype(labels.dtype, np.integer) and labels.max() > 5


def test_segment_with_a_checkpoint_and_threads(image_folder, tmp_path, tiny_checkpoint):
    images, _ = image_folder
    args = ["segment", "--model", str(tiny_checkpoint), "--threads", "1", "--tile", "128", "--out", str(tmp_path / "o"), str(images / "a.tif")]
    assert main(args) == 0
    assert tifffile.imread(tmp_path / "o" / "a.tif").shape == (160, 200)


def test_segment_refuses_to_overwrite_results(image_folder, tmp_path, capsys):
    images, _ = image_folder
    out = tmp_path / "out"
    assert main(["segment", "--model", "classical", "--out", str(out), str(images)]) == 0
    before = (out / "a.tif").stat().st_mtime_ns
    assert main(["segment", "--model", "classical", "--out", str(out), str(images)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "a.tif").stat().st_mtime_ns == before


def test_evaluate_prints_a_table_and_json(image_folder, tmp_path, capsys):
    images, gt = image_folder
    main(["segment", "--model", "classical", "--out", str(tmp_path / "p"), str(images)])
    capsys.readouterr()
    assert main(["evaluate", "--gt", str(gt), "--pred", str(tmp_path / "p"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["per_image"]) == {"a", "b"}
    assert 0.6 < report["mean"]["f1@0.5"] <= 1.0
    assert main(["evaluate", "--gt", str(gt), "--pred", str(gt)]) == 0
    assert "1.000" in capsys.readouterr().out


def test_info_reports_parameters(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["parameters"], int) and info["parameters"] > 0
    assert info["config"]["stem_stride"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "--model", "nonexistent.safetensors", "--out", "OUT", "IMG"], "input not found"),
        (["info", "no_such_model"], "neither teacher, student, classical nor an existing checkpoint"),
        (["evaluate", "--gt", "missing_dir", "--pred", "missing_dir"], "not found"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "napari_graphkd.cli", *args], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_image_is_one_line(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    proc = subprocess.run([sys.executable, "-m", "napari_graphkd.cli", "segment", "--model", "classical", "--out",
                           str(tmp_path / "o"), str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr
