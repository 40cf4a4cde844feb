"""Annotated folders, tune split, augmentation."""
import numpy as np
import pytest
import tifffile

from napari_graphkd.data import AugmentConfig, augment, load_folder, make_batch, split_tune


@pytest.fixture()
def folder(tmp_path, crop):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(3):
        tifffile.imwrite(tmp_path / "images" / f"im{i}.tif", np.rot90(crop[0], i).copy())
        tifffile.imwrite(tmp_path / "labels" / f"im{i}.tif", np.rot90(crop[1], i).copy())
    return tmp_path


def test_load_folder_pairs_images_with_labels(folder):
    samples = load_folder(folder)
    assert [s.name for s in samples] == ["im0", "im1", "im2"]
    assert samples[0].image.dtype == np.float32 and samples[0].labels.dtype == np.int32
    assert [s.name for s in load_folder(folder, names=["im1"])] == ["im1"]


def test_load_folder_errors_are_clear(folder, tmp_path_factory):
    (folder / "labels" / "im2.tif").unlink()
    with pytest.raises(ValueError, match="missing label file"):
        load_folder(folder)
    with pytest.raises(ValueError, match="must contain 'images/' and 'labels/'"):
        load_folder(tmp_path_factory.mktemp("empty"))


def test_tune_split_is_deterministic_and_disjoint():
    names = [f"n{i}" for i in range(20)]
    train, tune = split_tune(names, 5)
    assert len(tune) == 5 and not set(train) & set(tune) and sorted(train + tune) == sorted(names)
    assert split_tune(names, 5) == (train, tune)


def test_augmentation_keeps_image_and_labels_aligned(crop):
    image = crop[0].astype(np.float32) / crop[0].max()
    rng = np.random.default_rng(1)
    cfg = AugmentConfig(crop=96, elastic=True, noise_std=0.0, blur_prob=0.0)
    for _ in range(5):
        img, lab = augment(image, crop[1], cfg, rng)
        assert img.shape == lab.shape == (96, 96)
        if (lab > 0).any() and (lab == 0).any():
            assert img[lab > 0].mean() > img[lab == 0].mean()  # nuclei stay where the bright pixels are
        assert set(np.unique(lab)) <= set(np.unique(crop[1]))  # no invented ids (nearest interpolation)


def test_batches_have_the_requested_shape(folder):
    images, labels = make_batch(load_folder(folder), 3, AugmentConfig(crop=64), np.random.default_rng(0))
    assert images.shape == (3, 1, 64, 64) and labels.shape == (3, 64, 64)


def test_training_images_are_inverted_as_segment_will_invert_them(folder):
    """Dark nuclei on a bright background are inverted when loaded for training (the automatic rule of segment), so a
    model trained on bright-field receives its input at segment time the way it learnt it; a stated value wins."""
    from pathlib import Path

    from napari_graphkd.inference import working_image

    crops = Path(__file__).parents[1] / "examples" / "data" / "brightfield" / "train"
    path = sorted((crops / "images").glob("*.tif"))[0]
    tifffile.imwrite(folder / "images" / "bf.tif", tifffile.imread(path))
    tifffile.imwrite(folder / "labels" / "bf.tif", tifffile.imread(crops / "labels" / path.name))
    auto = {s.name: s.image for s in load_folder(folder)}
    raw = tifffile.imread(path)
    np.testing.assert_allclose(auto["bf"], working_image(raw, invert=True))
    np.testing.assert_allclose(auto["im0"], working_image(tifffile.imread(folder / "images" / "im0.tif"), invert=False))
    np.testing.assert_allclose(load_folder(folder, names=["bf"], invert=False)[0].image, working_image(raw, invert=False))
