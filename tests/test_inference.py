"""Inference: input rules, seamless tiling, object-size rescaling, stacks, clear errors."""
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_graphkd.inference import prepare_image, tiled_network, _network
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.preprocess import InputError, noise_sigma, normalize, to_grayscale
from napari_graphkd.planes import plane_layout
from napari_graphkd.segment import ClassicalSegmenter, ModelSegmenter, load_segmenter, segment_any

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model(UNetConfig(widths=(4, 8, 8))).eval()


def test_tiled_output_equals_whole_image_output_away_from_padding(net, crop):
    image = normalize(crop[0].astype(np.float32))
    whole_emb, whole_fg = _network(net, image)
    tiled_emb, tiled_fg = tiled_network(net, image, tile=96, overlap=48)
    # receptive field of this net is < 24 px: tiles overlapping by 48 px give the same numbers
    np.testing.assert_allclose(tiled_emb, whole_emb, atol=1e-4)
    np.testing.assert_allclose(tiled_fg, whole_fg, atol=1e-4)


def test_half_resolution_tiling_matches_the_whole_image_and_the_forward_pass(crop):
    torch.manual_seed(0)
    half = build_model(UNetConfig(widths=(4, 8, 8), stem_stride=2)).eval()
    image = normalize(crop[0][:, :195].astype(np.float32))  # odd width
    whole_emb, _ = _network(half, image)
    tiled_emb, _ = tiled_network(half, image, tile=96, overlap=48)
    assert whole_emb.shape == (16, 80, 98)
    np.testing.assert_allclose(tiled_emb, whole_emb, atol=1e-4)
    with torch.no_grad():
        forward, _ = half(torch.from_numpy(image)[None, None])
    from napari_graphkd.inference import NetworkOutput

    out = NetworkOutput(whole_emb, None, image.shape, 1.0, 0.0, stride=2)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(out.full_embedding()[inner], forward[0].numpy()[inner], atol=1e-4)


def test_half_resolution_decoding_returns_full_size_labels(tiny_checkpoint, crop):
    from napari_graphkd.decode.mws import DecodeSettings

    seg = ModelSegmenter(tiny_checkpoint)
    result = segment_any(seg, crop[0], decode=DecodeSettings(resolution="half"))
    assert result.labels.shape == crop[0].shape and result.labels.dtype == np.int32


def test_tiles_cover_every_pixel(net):
    image = np.random.default_rng(0).random((203, 157)).astype(np.float32)
    emb, fg = tiled_network(net, image, tile=64, overlap=32)
    assert emb.shape == (16, 203, 157) and np.isfinite(emb).all() and np.isfinite(fg).all()


def test_input_rules_for_dtypes_and_channels(crop):
    image = crop[0]
    gray_u16 = prepare_image(image)
    gray_u8 = prepare_image((image / image.max() * 255).astype(np.uint8))
    rgb = prepare_image(np.stack([image] * 3, axis=-1))
    assert gray_u16.dtype == np.float32 and gray_u16.shape == image.shape
    assert np.corrcoef(gray_u16.ravel(), gray_u8.ravel())[0, 1] > 0.99
    np.testing.assert_allclose(rgb, gray_u16, atol=1e-3)
    inverted = to_grayscale(image.max() - image.astype(np.float32), invert=True)
    np.testing.assert_allclose(normalize(inverted), gray_u16, atol=1e-4)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((64, 64), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((8, 64)), "too small"),
        (np.zeros((2, 3, 4, 5, 6)), "expected a 2D image"),
    ],
)
def test_bad_images_get_a_clear_error(image, message):
    with pytest.raises(InputError, match=message):
        prepare_image(image)


def test_diameter_rescales_the_input_and_labels_come_back_at_the_original_size(tiny_checkpoint, crop):
    seg = ModelSegmenter(tiny_checkpoint)
    out = seg.run_network(crop[0], diameter=56.0)  # objects twice the training size -> half-size input
    assert out.full_embedding().shape[1:] == (80, 100) and out.scale == pytest.approx(0.5)
    assert out.embedding.shape[1:] == (40, 50)  # the half-resolution network's native grid
    result = segment_any(seg, crop[0], diameter=56.0)
    assert result.labels.shape == crop[0].shape


def test_stacks_are_segmented_plane_by_plane(crop):
    stack = np.stack([crop[0], crop[0][::-1]])
    assert plane_layout(stack.shape) == ((2,), (160, 200)) and plane_layout((100, 100, 3)) == ((), (100, 100, 3))
    fractions = []
    result = segment_any(ClassicalSegmenter(), stack, on_progress=fractions.append)
    assert result.labels.shape == stack.shape and fractions == [0.5, 1.0]
    np.testing.assert_array_equal(result.labels[1] > 0, (result.labels[0] > 0)[::-1])


def test_empty_image_is_rejected():
    with pytest.raises(InputError, match="empty"):
        segment_any(ClassicalSegmenter(), np.zeros((0, 10)))


def test_noise_sigma_recovers_the_std_of_gaussian_noise_under_objects():
    rng = np.random.default_rng(0)
    image = 100.0 + rng.normal(0, 5.0, (256, 256))
    image[60:120, 60:120] += 1000.0  # a bright object: its edges are too few to move the median
    assert noise_sigma(image) == pytest.approx(5.0, rel=0.05)


def test_normalisation_stretches_images_with_nuclei_but_not_the_noise_of_an_empty_field(crop):
    """A nucleus-free field (real BBBC039 val crop) keeps a small range; a field with nuclei is unchanged."""
    empty = tifffile.imread(DATA / "bbbc039_L01_s2_nucleus_free_crop.tif").astype(np.float32)
    assert normalize(empty, min_contrast_snr=0).max() > 1.0  # plain percentile stretch: noise fills [0, 1]
    assert normalize(empty).max() < 0.3
    with_nuclei = crop[0].astype(np.float32)
    np.testing.assert_array_equal(normalize(with_nuclei), normalize(with_nuclei, min_contrast_snr=0))


@pytest.mark.parametrize("model", ["teacher", "student"])
def test_bundled_models_find_no_nucleus_in_a_nucleus_free_field(model):
    """Empty wells are common in screens; amplified sensor noise once gave the student 12 false nuclei here."""
    empty = tifffile.imread(DATA / "bbbc039_L01_s2_nucleus_free_crop.tif")
    assert segment_any(load_segmenter(model), empty).labels.max() == 0
