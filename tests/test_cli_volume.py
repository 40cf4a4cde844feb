"""graphkd segment / info on volumes: --3d, --voxel-size, 3D checkpoints, one-line errors."""
import json

import numpy as np
import pytest
import tifffile

from napari_graphkd.cli import main

from volume_utils import blob_volume, volume_checkpoint


@pytest.fixture()
def checkpoint3d(tmp_path):
    return volume_checkpoint(tmp_path / "tiny3d.safetensors")


@pytest.fixture()
def volume_file(tmp_path):
    folder = tmp_path / "volumes"
    folder.mkdir()
    tifffile.imwrite(folder / "v.tif", blob_volume((8, 40, 48))[0])
    return folder / "v.tif"


def test_a_3d_checkpoint_segments_volumes_as_volumes(checkpoint3d, volume_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", "--model", str(checkpoint3d), "--voxel-size", "4,1,1", "--tile", "200", "--threads", "1",
                 "--out", str(out), str(volume_file)]) == 0
    labels = tifffile.imread(out / "v.tif")
    assert labels.shape == (8, 40, 48) and labels.dtype in (np.uint16, np.uint32)
    printed = capsys.readouterr().out
    assert "3D: (Z,Y,X) images are segmented as volumes" in printed
    assert "voxel 4:1:1 (z:y:x)" in printed and "1 segmented, 0 failed" in printed


def test_volume_options_need_a_3d_model(volume_file, tmp_path, capsys):
    assert main(["segment", "--model", "classical", "--3d", "--out", str(tmp_path / "o"), str(volume_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("graphkd segment: error: --3d needs a 3D model; classical is 2D and segments a stack plane by plane "
                   "(drop --3d, or give --model a 3D checkpoint)")
    assert main(["segment", "--model", "classical", "--voxel-size", "3,1,1", "--out", str(tmp_path / "o"),
                 str(volume_file)]) == 2
    assert "--voxel-size needs a 3D model" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["1,2", "0,1,1", "a,b,c", "1,1,nan"])
def test_bad_voxel_sizes_are_one_line(text, volume_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--voxel-size", text, "--out", str(tmp_path / "o"), str(volume_file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--voxel-size" in err and "Z,Y,X" in err


def test_the_chunked_path_segments_volumes_of_3d_models(checkpoint3d, volume_file, tmp_path):
    import zarr

    assert main(["segment", "--model", str(checkpoint3d), "--chunked", "--chunk", "8,24,24", "--halo", "4,8,8",
                 "--tile", "300", "--workers", "0", "--threads", "1", "--out", str(tmp_path / "o.zarr"),
                 str(volume_file)]) == 0
    labels = zarr.open_array(str(tmp_path / "o.zarr"), mode="r")
    assert labels.shape == (8, 40, 48) and labels.chunks == (8, 24, 24)  # 3D chunks (tests/test_large3d.py)


def test_a_3d_model_refuses_2d_images_by_name(checkpoint3d, tmp_path, crop, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    tifffile.imwrite(folder / "plane.tif", crop[0])
    assert main(["segment", "--model", str(checkpoint3d), "--out", str(tmp_path / "o"), str(folder)]) == 1
    err = capsys.readouterr().err
    assert "plane.tif: a 3D model segments (Z,Y,X) volumes; the image has shape (160, 200)" in err
    assert not (tmp_path / "o" / "plane.tif").exists()


def test_info_shows_dimensionality_and_voxel_size(checkpoint3d, tiny_checkpoint, capsys):
    assert main(["info", str(checkpoint3d)]) == 0
    text = capsys.readouterr().out
    assert "ndim: 3D: segments (Z,Y,X) volumes as a whole" in text
    assert "voxel_size: 2:1:1 (z:y:x of its training volumes" in text
    assert main(["info", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ndim"] == 2 and "voxel_size" not in info


@pytest.fixture()
def volume_folder(tmp_path):
    """images/ + labels/ holding two small annotated (Z,Y,X) volumes."""
    root = tmp_path / "vols"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        volume, labels = blob_volume((8, 40, 48), seed=i)
        tifffile.imwrite(root / "images" / f"v{i}.tif", volume)
        tifffile.imwrite(root / "labels" / f"v{i}.tif", labels.astype(np.uint16))
    return root


def test_volume_folders_load_as_normalised_volumes(volume_folder, tmp_path, crop):
    from napari_graphkd.data import folder_ndim, load_folder

    samples = load_folder(volume_folder)
    assert folder_ndim(volume_folder) == 3 and [s.name for s in samples] == ["v0", "v1"]
    assert samples[0].image.shape == samples[0].labels.shape == (8, 40, 48) and samples[0].image.dtype == np.float32
    assert samples[0].image.max() > 0.9 and np.percentile(samples[0].image, 1) < 0.05  # stretched as a whole
    tifffile.imwrite(volume_folder / "images" / "w.tif", crop[0])
    tifffile.imwrite(volume_folder / "labels" / "w.tif", crop[1])
    with pytest.raises(ValueError, match="mixes 2D images and"):
        load_folder(volume_folder)


def test_train_and_distill_check_the_data_against_the_architecture(volume_folder, tmp_path, crop, tiny_checkpoint,
                                                                   checkpoint3d, capsys):
    flat = tmp_path / "flat"
    for sub in ("images", "labels"):
        (flat / sub).mkdir(parents=True)
    tifffile.imwrite(flat / "images" / "a.tif", crop[0])
    tifffile.imwrite(flat / "labels" / "a.tif", crop[1])
    common = ["--out", str(tmp_path / "run"), "--steps", "1", "--n-tune", "1"]
    assert main(["train", "--data", str(flat), "--arch", "unet3d-teacher", *common]) == 2
    assert "--arch unet3d-teacher is 3D: " in capsys.readouterr().err
    assert main(["train", "--data", str(volume_folder), "--arch", "resunet-cpu-teacher", *common]) == 2
    err = capsys.readouterr().err
    assert "holds (Z,Y,X) volumes: --arch resunet-cpu-teacher is 2D; choose a 3D one (" in err and "unet3d-teacher" in err
    assert main(["distill", "--teacher", str(checkpoint3d), "--data", str(volume_folder), *common]) == 2
    assert "the teacher is 3D and --student halfres-student is 2D; choose a 3D student (" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(tiny_checkpoint), "--student", "unet3d-student", "--data", str(flat),
                 *common]) == 2
    assert "the teacher is 2D and --student unet3d-student is 3D" in capsys.readouterr().err
    assert main(["train", "--data", str(flat), "--arch", "nope", *common]) == 2
    assert "unknown architecture 'nope'; known: " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_distill_segment_on_a_volume_folder(volume_folder, tmp_path, capsys):
    """The README's 3D commands on two tiny volumes: train a 3D teacher, distil a 3D student, segment with both."""
    teacher_run, student_run, out = tmp_path / "t3d", tmp_path / "s3d", tmp_path / "out"
    common = ["--steps", "2", "--batch-size", "1", "--validate-every", "2", "--volume-crop", "8,32,32"]  # --n-tune 10
    assert main(["train", "--data", str(volume_folder), "--arch", "unet3d-student", "--voxel-size", "2,1,1",
                 "--out", str(teacher_run), "--threads", "1", *common]) == 0
    assert "1 volume(s) to train, 1 to tune" in capsys.readouterr().err  # of two, one is kept to train on
    checkpoint = teacher_run / "last.safetensors"
    assert main(["info", str(checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ndim"] == 3 and info["voxel_size"] == [2.0, 1.0, 1.0] and info["offsets"][0] == [-1, 0, 0]
    assert main(["distill", "--teacher", str(checkpoint), "--student", "unet3d-student", "--data", str(volume_folder),
                 "--out", str(student_run), "--method", "grd", *common]) == 0
    assert main(["segment", "--model", str(student_run / "last.safetensors"), "--voxel-size", "2,1,1", "--out", str(out),
                 str(volume_folder / "images")]) == 0
    assert tifffile.imread(out / "v0.tif").shape == (8, 40, 48)
