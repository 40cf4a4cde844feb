"""``graphkd finetune`` on a tiny folder of shipped bright-field crops: writes a new checkpoint, never overwrites."""
import shutil
from pathlib import Path

import pytest
import torch

from napari_graphkd.cli import main
from napari_graphkd.io.checkpoint import read_metadata, save_checkpoint
from napari_graphkd.models import UNetConfig, build_model

torch.set_num_threads(1)
CROPS = Path(__file__).parents[1] / "examples" / "data" / "brightfield" / "train"


@pytest.fixture()
def painted(tmp_path):
    """FOLDER/images and FOLDER/labels with two bright-field crops (the second is held out)."""
    folder = tmp_path / "painted"
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
        for path in sorted((CROPS / sub).glob("*.tif"))[:2]:
            shutil.copy(path, folder / sub / path.name)
    return folder


@pytest.fixture()
def tiny(tmp_path):
    """(teacher, student) tiny random checkpoints."""
    paths = []
    for seed, name in ((0, "t"), (1, "s")):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(tmp_path / f"{name}.safetensors", build_model(UNetConfig(widths=(4, 8, 8), stem_stride=2)),
                                     {"name": name}))
    return [str(p) for p in paths]


def test_finetune_command_writes_a_new_checkpoint_and_never_overwrites(painted, tiny, tmp_path, capsys):
    teacher, student = tiny
    out = tmp_path / "mine.safetensors"
    args = ["finetune", str(painted), "--model", student, "--teacher", teacher, "--mode", "finetune", "--steps", "2",
            "--invert", "yes", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "student before" in captured.out and "student after" in captured.out
    assert f"saved student: {out}" in captured.out and "held out entirely" in captured.out
    assert "training student: 2/2" in captured.err
    meta = read_metadata(out)
    assert meta["finetune"]["mode"] == "finetune" and meta["finetune"]["decode_tuned_on"] == "held-out cells"
    assert meta["input"]["invert"] is True and "foreground_threshold" in meta["decode"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors", "painted", "s.safetensors", "t.safetensors"]
    data = out.read_bytes()
    assert main(args) == 2 and out.read_bytes() == data
    assert "exists" in capsys.readouterr().err
    assert main(args[:-1] + [str(tmp_path / "other.safetensors"), "--mode", "nonsense"]) == 2  # the last --mode wins
    assert "unknown mode" in capsys.readouterr().err


def test_finetune_command_default_mode_trains_the_teacher_then_the_student(painted, tiny, tmp_path, capsys):
    teacher, student = tiny
    out = tmp_path / "mine.safetensors"
    assert main(["finetune", str(painted), "--model", student, "--teacher", teacher, "--steps", "2", "--teacher-steps", "1",
                 "--invert", "yes", "--unpainted", "background", "--out", str(out)]) == 0
    new_teacher = tmp_path / "mine-teacher.safetensors"
    captured = capsys.readouterr()
    assert f"saved teacher: {new_teacher}" in captured.out
    assert "training teacher: 1/1" in captured.err and "training student: 2/2" in captured.err
    assert read_metadata(out)["finetune"]["settings"]["teacher_steps"] == 1
    assert read_metadata(out)["finetune"]["teacher"]["path"] == str(new_teacher)
    assert read_metadata(new_teacher)["finetune"]["mode"] == "teacher"
