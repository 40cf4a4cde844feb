"""Input rules on real images: polarity, hematoxylin input channel, what the pipeline decides and reports."""
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import data as skdata
from skimage.color import hed2rgb

from napari_graphkd.preprocess import InputError, detect_polarity, hematoxylin, is_stained_rgb
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import ClassicalSegmenter, InputDecision, RunSettings, decide_inputs, segment_any

ROOT = Path(__file__).resolve().parents[1]
BRIGHTFIELD = sorted((ROOT / "examples" / "data" / "brightfield").glob("*/images/*.tif"))
EMPTY = Path(__file__).parent / "data" / "bbbc039_L01_s2_nucleus_free_crop.tif"


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_fluorescence_samples_are_not_inverted(name):
    image, _ = load_sample(name)
    assert not detect_polarity(image)
    assert not detect_polarity(image.astype(np.float32) / 4095)  # dtype and scale do not matter


def test_brightfield_crops_are_inverted():
    assert len(BRIGHTFIELD) == 8, "the bright-field example crops ship with the repository"
    for path in BRIGHTFIELD:
        image = tifffile.imread(path)
        assert detect_polarity(image), path.name
        assert not detect_polarity(255 - image), path.name  # the same crop as a fluorescence image


def test_image_without_objects_is_not_inverted():
    """A nucleus-free field is only sensor noise: no evidence for inversion, whatever its histogram."""
    image = tifffile.imread(EMPTY)
    assert not detect_polarity(image) and not detect_polarity(image.max() - image)


def test_hematoxylin_channel_makes_stained_nuclei_bright():
    """Nuclei of a bright-field crop, painted with hematoxylin (and an eosin wash) on white, come back bright."""
    path = BRIGHTFIELD[0]
    labels = tifffile.imread(str(path).replace("/images/", "/labels/"))
    stain = 1.0 - tifffile.imread(path).astype(np.float64) / 255  # dark nuclei -> much stain
    hed = np.stack([0.6 * stain * (labels > 0) + 0.05 * stain, 0.3 * stain, np.zeros_like(stain)], -1)
    rgb = (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)
    h = hematoxylin(rgb)
    assert h[labels > 0].mean() > 3 * h[labels == 0].mean()
    rules = decide_inputs(ClassicalSegmenter(), rgb, diameter=None)
    assert rules.channel == "hematoxylin" and rules.invert is False and set(rules.estimated) == {"channel", "invert"}
    result = segment_any(ClassicalSegmenter(), rgb, diameter=None)
    found = np.unique(labels[(result.labels > 0) & (labels > 0)])
    assert result.inputs == rules and len(found) >= 0.8 * labels.max()  # the classical floor finds the stained nuclei


def test_stained_rgb_tile_takes_the_hematoxylin_channel():
    """An immunohistochemistry tile (hematoxylin + DAB, shipped with scikit-image) is stained RGB; its luminance is inverted."""
    ihc = skdata.immunohistochemistry()
    assert is_stained_rgb(ihc) and detect_polarity(ihc)
    rules = decide_inputs(ClassicalSegmenter(), ihc, diameter=None)
    assert (rules.channel, rules.invert) == ("hematoxylin", False)
    rules = decide_inputs(ClassicalSegmenter(), ihc, diameter=None, channel="luminance")
    assert (rules.channel, rules.invert, rules.estimated) == ("luminance", True, ("invert",))


def test_fluorescence_in_rgb_and_gray_rgb_stay_on_luminance(sample):
    image = (sample[0] >> 4).astype(np.uint8)
    blue = np.stack([np.zeros_like(image), np.zeros_like(image), image], -1)
    gray_rgb = np.stack([image] * 3, -1)
    for rgb in (blue, gray_rgb):
        assert not is_stained_rgb(rgb)
        rules = decide_inputs(ClassicalSegmenter(), rgb, diameter=None)
        assert (rules.channel, rules.invert) == ("luminance", False)


def test_user_values_override_and_are_not_marked_estimated():
    tile = tifffile.imread(BRIGHTFIELD[0])
    rules = decide_inputs(ClassicalSegmenter(), tile, diameter=20.0, invert=False, channel="luminance")
    assert rules == InputDecision(20.0, False, "luminance") and rules.estimated == ()
    assert rules.describe() == "20 px, not inverted, luminance"
    rules = decide_inputs(ClassicalSegmenter(), tile, diameter=None)
    assert rules.describe() == "as trained, inverted (auto), luminance (auto)"
    assert rules.run_settings(tile=512) == RunSettings(None, True, "luminance", 512)
    assert rules.to_dict() == {"diameter": None, "invert": True, "channel": "luminance", "estimated": ["channel", "invert"]}


@pytest.mark.parametrize("kwargs", [{"channel": "red"}, {"invert": "yes"}, {"diameter": 0}, {"diameter": float("nan")},
                                    {"diameter": "big"}])
def test_bad_rules_are_refused(sample, kwargs):
    with pytest.raises(InputError):
        decide_inputs(ClassicalSegmenter(), sample[0], **kwargs)


def test_hematoxylin_needs_rgb(sample):
    with pytest.raises(InputError, match="RGB"):
        hematoxylin(sample[0])
    with pytest.raises(InputError, match="RGB"):
        segment_any(ClassicalSegmenter(), sample[0], channel="hematoxylin")


def test_cli_reports_the_rules_chosen_per_image_and_takes_user_values(tmp_path, capsys):
    from napari_graphkd.cli import main

    crop = tifffile.imread(BRIGHTFIELD[0])
    tifffile.imwrite(tmp_path / "bf.tif", crop)
    out = ["--model", "classical", "--out", str(tmp_path / "out"), "--overwrite"]
    assert main(["segment", str(tmp_path / "bf.tif"), *out]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("bf.tif")][0]
    assert line.endswith("(auto), inverted (auto), luminance (auto)")
    assert main(["segment", str(tmp_path / "bf.tif"), *out, "--diameter", "20", "--invert", "no", "--channel", "luminance"]) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith("20 px, not inverted, luminance")
    assert main(["segment", str(tmp_path / "bf.tif"), *out, "--diameter", "20", "--invert"]) == 0  # --invert alone: yes
    assert "20 px, inverted, luminance (auto)" in capsys.readouterr().out
    for bad in (["--diameter", "big"], ["--diameter", "-3"], ["--invert", "maybe"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["segment", str(tmp_path / "bf.tif"), *out, *bad])
        assert exit_info.value.code == 2


def test_chunked_path_decides_the_rules_on_a_central_window(tmp_path, capsys):
    from napari_graphkd.cli import main

    crop = tifffile.imread(BRIGHTFIELD[0])
    tifffile.imwrite(tmp_path / "bf.tif", crop)
    args = ["segment", str(tmp_path / "bf.tif"), "--chunked", "--model", "student", "--chunk", "256", "--workers", "0",
            "--threads", "1", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert "bf.tif: input rules " in (out := capsys.readouterr().out) and "inverted (auto), luminance" in out
    assert main([*args, "--overwrite", "--channel", "hematoxylin"]) == 2
    assert "luminance only" in capsys.readouterr().err
