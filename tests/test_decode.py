"""Decoding: the ground-truth round trip (sign conventions), background and fragment rules."""
import numpy as np
import pytest

from conftest import relabel_equal
from napari_graphkd.affinity import label_affinities
from napari_graphkd.decode.mws import (
    DecodeSettings, decode, fragment_mutex_watershed, fragments, merge_fragments, mutex_watershed, remove_background,
    strongest_edges,
)


def test_decoding_ground_truth_affinities_returns_the_ground_truth(sample):
    _, labels = sample
    target, _ = label_affinities(labels)
    decoded = decode(target, (labels > 0).astype(np.float32), DecodeSettings(min_size=0))
    assert relabel_equal(decoded, labels)


def test_ground_truth_round_trip_holds_for_every_stride_and_bias(crop):
    _, labels = crop
    target, _ = label_affinities(labels)
    for stride in (1, 2, 4):
        for bias in (0.0, 0.5):
            segments = mutex_watershed(target, attractive_bias=bias, stride=stride)
            assert relabel_equal(remove_background(segments, (labels > 0).astype(float)), labels)


def test_flipped_sign_convention_is_caught(crop):
    """Feeding dis-affinities (the elf convention) must not reproduce the labels."""
    _, labels = crop
    target, _ = label_affinities(labels)
    decoded = decode(1.0 - target, (labels > 0).astype(np.float32), DecodeSettings(min_size=0))
    assert not relabel_equal(decoded, labels)


def test_background_segments_are_removed_by_foreground_probability():
    segments = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]])
    fg = np.array([[0.9, 0.8, 0.1, 0.2], [0.7, 0.9, 0.3, 0.1], [0.6, 0.6, 0.6, 0.6]])
    out = remove_background(segments, fg, 0.5)
    assert (out[:2, 2:] == 0).all()
    assert len(np.unique(out[:2, :2])) == 1 and out[0, 0] > 0
    assert (out[2] > 0).all()


def test_small_fragments_merge_into_their_neighbour_or_vanish():
    labels = np.zeros((10, 10), dtype=np.int64)
    labels[2:8, 2:6] = 1  # 24 px object
    labels[2:8, 6] = 2  # 6 px boundary sliver touching object 1
    labels[0, 9] = 3  # isolated speck far from anything
    out = merge_fragments(labels, min_size=10, distance=2)
    assert (out[2:8, 2:7] == 1).all()
    assert out[0, 9] == 0


def test_decode_without_foreground_head_uses_the_border_segment_as_background(crop):
    _, labels = crop
    target, _ = label_affinities(labels)
    decoded = decode(target, None, DecodeSettings(min_size=0))
    # border-touching background is removed; nuclei (some touch the border) stay
    assert (decoded[labels == 0] == 0).mean() > 0.99
    assert len(np.unique(decoded)) > 5


@pytest.mark.parametrize("resolution", ["half", "quarter"])
def test_coarse_decoding_of_a_perfect_embedding_recovers_the_instances(crop, resolution):
    """One-hot embeddings of the ground truth, decoded on a 2x/4x coarser grid, give the labels back
    up to the grid's limit: pooled boundary pixels resemble both neighbours. Long-range edges are
    dense here: on a stride-4 grid a touching pair may get no repelling edge at all (1-2 of 14
    merge on this crop, depending on where the grid falls), which is the stride's trade-off, not
    the coarse grid's."""
    from napari_graphkd.decode.policy import decode_output
    from napari_graphkd.inference import NetworkOutput
    from napari_graphkd.metrics import evaluate

    _, labels = crop
    onehot = np.eye(labels.max() + 1, dtype=np.float32)[labels].transpose(2, 0, 1)
    output = NetworkOutput(onehot, (labels > 0).astype(np.float32), labels.shape, 1.0, 0.0)
    decoded, _ = decode_output(output, DecodeSettings(resolution=resolution, min_size=20, long_range_stride=1))
    scores = evaluate(labels, decoded)
    assert scores["n_pred"] >= scores["n_gt"] - 1 and scores["f1@0.5"] >= 0.95 and scores["aji"] >= 0.85


def test_holes_inside_an_object_take_its_id_and_small_objects_drop():
    from napari_graphkd.decode.mws import drop_small, fill_holes

    labels = np.zeros((7, 7), dtype=np.int64)
    labels[1:6, 1:6] = 4
    labels[3, 3] = 0  # a one-pixel hole
    labels[0, 6] = 9  # a one-pixel object
    filled = fill_holes(labels)
    assert filled[3, 3] == 4 and filled[0, 6] == 9 and filled[0, 0] == 0
    cleaned = drop_small(filled, min_size=2)
    assert set(np.unique(cleaned)) == {0, 1} and (cleaned[1:6, 1:6] == 1).all()


def noisy_affinities(labels: np.ndarray, sigma: float = 0.3) -> np.ndarray:
    """Ground-truth affinities plus Gaussian noise (unclipped, so no two edge weights tie)."""
    target, _ = label_affinities(labels)
    return (target + np.random.default_rng(0).normal(0, sigma, target.shape)).astype(np.float32)


@pytest.mark.parametrize("stride", [1, 4])
def test_fragment_graph_without_pre_merge_equals_the_pixel_mutex_watershed(crop, stride):
    """Every pixel its own fragment and support everywhere: the fragment graph is the pixel graph."""
    _, labels = crop
    noisy = noisy_affinities(labels)
    whole = mutex_watershed(noisy, attractive_bias=0.2, stride=stride)
    graph = fragment_mutex_watershed(noisy, np.ones(labels.shape, np.float32), attractive_bias=0.2, stride=stride,
                                     foreground_threshold=float("-inf"), attraction=float("inf"))
    assert relabel_equal(graph, whole)


def test_pre_merged_fragments_follow_strong_attraction_and_background():
    """Pixels join where the 1-px weight exceeds the attraction, or both are background; nowhere else."""
    aff = np.zeros((10, 4, 6), np.float32)
    aff[1, :, 1:3] = 0.99  # rows: pixels (r, 0..2) joined horizontally
    fg = np.full((4, 6), 0.9, np.float32)
    fg[:, 4:] = 0.1  # the last two columns are background
    ids, n = fragments(aff, fg, np.ones((4, 6), bool), attractive_bias=0.0, foreground_threshold=0.5, attraction=0.95)
    for r in range(4):
        assert ids[r, 0] == ids[r, 1] == ids[r, 2] and ids[r, 3] != ids[r, 2]
    assert len(np.unique(ids[:, 4:])) == 1 and ids[0, 4] not in ids[:, :4]
    assert n == 4 + 4 + 1  # four rows of three, four singletons in column 3, one background fragment


def test_strongest_edges_keep_the_largest_magnitude_per_pair_in_processing_order():
    u = np.array([1, 2, 1, 3, 3])
    v = np.array([2, 1, 2, 1, 4])
    w = np.array([0.5, -0.9, 0.2, 0.7, -0.1])
    assert strongest_edges(u, v, w) == [(False, 1, 2), (True, 1, 3), (False, 3, 4)]


def test_pre_merge_keeps_the_ground_truth_round_trip_and_noisy_decoding_close(crop):
    """On noisy ground-truth affinities the fragment decoder scores like the pixel decoder."""
    from napari_graphkd.metrics import evaluate

    _, labels = crop
    noisy = noisy_affinities(labels, sigma=0.2)
    fg = (labels > 0).astype(np.float32)
    fast = evaluate(labels, remove_background(fragment_mutex_watershed(noisy, fg, attractive_bias=0.2), fg))
    slow = evaluate(labels, remove_background(mutex_watershed(noisy, attractive_bias=0.2), fg))
    assert fast["f1@0.5"] >= slow["f1@0.5"] - 0.02 and fast["aji"] >= slow["aji"] - 0.02


def test_separate_foreground_regions_never_share_a_label_and_the_rest_stays_background():
    """Affinities that attract everywhere would merge the whole image; the support keeps blobs apart."""
    fg = np.zeros((60, 80), np.float32)
    fg[10:20, 10:20] = fg[40:50, 50:70] = 0.9
    attract = np.ones((10, 60, 80), np.float32)
    out = fragment_mutex_watershed(attract, fg, attractive_bias=0.0)
    assert len(np.unique(mutex_watershed(attract, attractive_bias=0.0))) == 1
    a, b = out[15, 15], out[45, 60]
    assert a > 0 and b > 0 and a != b
    assert (out[fg > 0] > 0).all() and out[30, 40] == 0 and out[0, 79] == 0


def test_images_smaller_than_the_longest_affinity_offset_decode():
    """mwatershed rejects offsets longer than the image; those are skipped, not a crash."""
    labels = np.zeros((20, 24), np.int32)
    labels[3:10, 3:12], labels[12:18, 10:20] = 1, 2
    target, _ = label_affinities(labels)
    decoded = decode(target, (labels > 0).astype(np.float32), DecodeSettings(min_size=0))
    assert relabel_equal(decoded, labels)


@pytest.mark.parametrize("factor, shape", [(2, (41, 57)), (4, (40, 62))])
def test_refinement_decides_exactly_the_pixels_within_factor_px_of_a_coarse_outline(factor, shape):
    """The coarse-grid 3x3 filters equal full-resolution (2*factor+1) windows, odd sizes included."""
    from scipy import ndimage as ndi
    from napari_graphkd.decode.mws import refine_upsampled

    rng = np.random.default_rng(factor)
    coarse_shape = (-(-shape[0] // factor), -(-shape[1] // factor))
    coarse = ndi.zoom(rng.integers(0, 4, (5, 6)), [c / s for c, s in zip(coarse_shape, (5, 6))], order=0)
    coarse = coarse[: coarse_shape[0], : coarse_shape[1]]
    foreground = rng.random(shape).astype(np.float32)
    settings = DecodeSettings(foreground_threshold=0.5, min_size=0)

    up = np.repeat(np.repeat(coarse, factor, 0), factor, 1)[: shape[0], : shape[1]]
    window = 2 * factor + 1
    high = ndi.maximum_filter(up, size=window)
    near = high != ndi.minimum_filter(up, size=window)
    expected = np.where(near, np.where(foreground >= 0.5, np.where(up > 0, up, high), 0), up)
    assert relabel_equal(refine_upsampled(coarse, foreground, shape, settings, factor), expected)


def test_decoding_is_reproducible(crop):
    """mwatershed names clusters in no fixed order; the decoder's labels must not depend on it."""
    _, labels = crop
    noisy = noisy_affinities(labels)
    fg = (labels > 0).astype(np.float32)
    runs = [decode(noisy, fg, DecodeSettings(attractive_bias=0.0)) for _ in range(4)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
