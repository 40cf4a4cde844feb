"""The graphkd command line, as a user runs it: outputs, tables, one-line errors, no overwrites."""
import json
import subprocess
import sys
from pathlib import Path

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


def test_rerun_skips_finished_outputs_unless_overwrite(image_folder, tmp_path, capsys):
    images, _ = image_folder
    out = tmp_path / "out"
    assert main(["segment", "--model", "classical", "--out", str(out), str(images)]) == 0
    before = (out / "a.tif").stat().st_mtime_ns
    assert main(["segment", "--model", "classical", "--out", str(out), str(images)]) == 0
    assert "0 segmented, 0 failed; 2 skipped (output exists; --overwrite to redo)" in capsys.readouterr().out
    assert (out / "a.tif").stat().st_mtime_ns == before
    assert main(["segment", "--model", "classical", "--overwrite", "--out", str(out), str(images)]) == 0
    assert "2 segmented, 0 failed" in capsys.readouterr().out and (out / "a.tif").stat().st_mtime_ns != before


@pytest.mark.parametrize("out, inputs", [("{images}", ["{images}"]), ("{images}/../images", ["{images}"]),
                                         ("{images}", ["{images}/a.tif"])])
def test_outputs_never_replace_inputs_whatever_the_flags(image_folder, capsys, out, inputs):
    images, _ = image_folder
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    args = ["segment", "--model", "classical", "--overwrite", "--out", out.format(images=images), *(i.format(images=images) for i in inputs)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose another" in err
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_a_folder_with_unreadable_files_segments_the_rest_and_resumes(image_folder, tmp_path, capsys):
    images, _ = image_folder
    (images / "bad.tif").write_bytes(b"not a tiff")
    (images / "empty.tif").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["segment", "--model", "classical", "--out", str(out), str(images)]) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]
    assert "2 segmented, 2 failed: bad.tif, empty.tif" in captured.out
    failures = [line for line in captured.err.splitlines() if line.startswith("graphkd segment:")]
    assert [line.split(":")[1].strip() for line in failures] == ["bad.tif", "empty.tif"]
    assert main(["segment", "--model", "classical", "--out", str(out), str(images)]) == 1  # resumes: only the bad ones again
    assert "0 segmented, 2 failed: bad.tif, empty.tif; 2 skipped" in capsys.readouterr().out


def test_a_killed_write_leaves_no_half_written_label_file(image_folder, tmp_path, monkeypatch):
    images, _ = image_folder
    out = tmp_path / "out"
    original = tifffile.imwrite

    def killed(path, *args, **kwargs):
        Path(path).write_bytes(b"II*\x00 half")  # the first bytes of a TIFF, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", killed)
    assert main(["segment", "--model", "classical", "--out", str(out), str(images / "a.tif")]) == 130
    assert list(out.iterdir()) == []
    monkeypatch.setattr(tifffile, "imwrite", original)
    assert main(["segment", "--model", "classical", "--out", str(out), str(images / "a.tif")]) == 0
    assert tifffile.imread(out / "a.tif").max() > 5


@pytest.mark.parametrize("args, message", [
    (["segment", "--threads", "-1"], "--threads: must be 0"),
    (["demo", "--threads", "-1"], "--threads: must be 0"),
    (["segment", "--threads", "two"], "not a whole number"),
    (["segment", "--diameter", "nan"], "--diameter: must be a positive number"),
    (["segment", "--diameter", "inf"], "--diameter: must be a positive number"),
    (["segment", "--diameter", "-10"], "--diameter: must be a positive number"),
    (["segment", "--diameter", "0"], "--diameter: must be a positive number"),
    (["segment", "--diameter", "big"], "neither a number of pixels nor 'auto'"),
])
def test_bad_numbers_are_one_line(args, message, image_folder, tmp_path, capsys):
    images, _ = image_folder
    extra = ["--out", str(tmp_path / "o"), str(images)] if args[0] == "segment" else []
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err and err.startswith(f"graphkd {args[0]}: error:")


def test_a_tiny_diameter_is_refused_before_anything_is_allocated(image_folder, tmp_path, tiny_checkpoint, capsys):
    images, _ = image_folder
    assert main(["segment", "--model", str(tiny_checkpoint), "--diameter", "0.01", "--out", str(tmp_path / "o"), str(images / "a.tif")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nucleus diameter 0.01 px would rescale" in err and "268,435,456" in err


def test_stacks_and_time_series_are_segmented_plane_by_plane(crop, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    image = crop[0]
    tifffile.imwrite(folder / "plane.tif", image)
    tifffile.imwrite(folder / "stack.tif", np.stack([image] * 3))
    tifffile.imwrite(folder / "series.tif", np.stack([np.stack([image] * 2)] * 2))  # (T, Z, Y, X)
    tifffile.imwrite(folder / "five_d.tif", np.zeros((2, 2, 2, 160, 200), np.uint16))
    assert main(["segment", "--model", "classical", "--diameter", "30", "--invert", "--out", str(tmp_path / "o"), str(folder)]) == 1
    captured = capsys.readouterr()
    rows = {line.split()[0]: line.split() for line in captured.out.splitlines() if line.endswith("luminance (auto)")}
    plane = int(rows["plane.tif"][1])
    assert plane > 0 and int(rows["stack.tif"][1]) == 3 * plane and int(rows["series.tif"][1]) == 4 * plane
    assert " ".join(rows["plane.tif"][4:]) == "30 px, inverted, luminance (auto)"  # the rules, as given or chosen
    assert tifffile.imread(tmp_path / "o" / "series.tif").shape == (2, 2, 160, 200)
    assert "five_d.tif: cannot segment an image of shape (2, 2, 2, 160, 200)" in captured.err
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
        (["segment", "--model", "nonexistent.safetensors", "--out", "OUT", "img.tif"],
         "model 'nonexistent.safetensors' is neither teacher, student, classical nor an existing checkpoint file"),
        (["segment", "--model", "classical", "--out", "OUT", "missing.tif"], "input not found: missing.tif"),
        (["info", "no_such_model"], "neither teacher, student, classical nor an existing checkpoint"),
        (["evaluate", "--gt", "missing_dir", "--pred", "missing_dir"], "not found"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(args, message, tmp_path, monkeypatch, crop):
    monkeypatch.chdir(tmp_path)
    tifffile.imwrite(tmp_path / "img.tif", crop[0])  # the input exists: the error under test is the named one
    proc = subprocess.run([sys.executable, "-m", "napari_graphkd.cli", *args], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_image_is_one_line_and_a_failed_exit(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    proc = subprocess.run([sys.executable, "-m", "napari_graphkd.cli", "segment", "--model", "classical", "--out",
                           str(tmp_path / "o"), str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr


def test_segment_prints_concrete_advice_when_the_image_is_unlike_the_training_data(tmp_path, capsys):
    crops = Path(__file__).resolve().parents[1] / "examples" / "data" / "brightfield" / "test" / "images"
    crop = sorted(crops.glob("*.tif"))[0]
    assert main(["segment", str(crop), "--model", "student", "--invert", "no", "--diameter", "28",
                 "--threads", "1", "--out", str(tmp_path / "bf")]) == 0
    err = capsys.readouterr().err
    assert f"advice for {crop.name}:" in err and "dark on bright" in err  # bright-field shown as if fluorescence
    image = tmp_path / "fluo.tif"
    from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample

    tifffile.imwrite(image, load_sample(SAMPLE_NAMES[0])[0])
    assert main(["segment", str(image), "--model", "student", "--threads", "1", "--out", str(tmp_path / "fl")]) == 0
    assert "advice" not in capsys.readouterr().err  # an image like the training data gets none
