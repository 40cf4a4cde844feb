"""The volume path of the one pipeline: 3D tiling, voxel-size rescaling, 3D decoding, progress, cancel and clear errors.

A fake 3D network (tests/volume_utils.py: bright voxels are foreground, embeddings follow the
intensity) stands in for a trained one, so the labels it must give are known.
"""
import numpy as np
import pytest
import torch

from napari_graphkd import segment
from napari_graphkd.affinity import offsets_for
from napari_graphkd.inference import NetworkOutput, _network, tiled_network, volume_tile, working_volume
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.preprocess import InputError
from napari_graphkd.segment import (ModelSegmenter, Stopped, check_voxel_size, plane_output, segment_any,
                                    volume_scale)

from volume_utils import OFFSETS_3D, FakeNet3d, blob_volume


@pytest.fixture()
def fake3d():
    return ModelSegmenter(model=FakeNet3d(), metadata={"name": "fake3d", "voxel_size": [1.0, 1.0, 1.0],
                                                        "offsets": [list(o) for o in offsets_for(3)]})


def test_3d_tiles_give_the_whole_volume_output_and_cover_every_voxel():
    net = FakeNet3d()
    volume = np.random.default_rng(0).random((13, 45, 38)).astype(np.float32)  # not multiples of (2, 4, 4)
    whole_emb, whole_fg = _network(net, volume)
    ticks = []
    emb, fg = tiled_network(net, volume, tile=20, overlap=8, on_tile=lambda done, total: ticks.append((done, total)))
    assert emb.shape == (16, 13, 45, 38) and fg.shape == (13, 45, 38)
    assert ticks[-1][0] == ticks[-1][1] == 1 * 4 * 3  # padded to 14x48x40: z fits one 20-voxel tile, y needs 4, x 3
    np.testing.assert_allclose(emb, whole_emb, atol=1e-6)
    np.testing.assert_allclose(fg, whole_fg, atol=1e-6)


def test_3d_unet_tiles_match_the_whole_pass_away_from_padding():
    """A real (dimension-generic) 3D U-Net, when the library has one: tiling is seamless in z, y and x."""
    torch.manual_seed(0)
    net = build_model(UNetConfig(widths=(4, 8), ndim=3, pool=((1, 2, 2),))).eval()  # receptive field < 24 voxels
    volume = np.random.default_rng(1).random((9, 70, 66)).astype(np.float32)
    whole_emb, _ = _network(net, volume)
    emb, _ = tiled_network(net, volume, tile=48, overlap=24)
    assert emb.shape == (16, 9, 70, 66)
    np.testing.assert_allclose(emb, whole_emb, atol=1e-4)


def test_network_output_of_a_volume_upsamples_per_axis():
    emb = np.random.default_rng(0).random((16, 5, 6, 7)).astype(np.float32)
    out = NetworkOutput(emb, emb[0], (5, 11, 13), (1.0, 1.0, 1.0), 0.0, stride=(1, 2, 2), offsets=OFFSETS_3D)
    assert out.ndim == 3 and out.affinity_offsets == OFFSETS_3D
    assert out.full_embedding().shape == (16, 5, 11, 13) and out.full_foreground().shape == (5, 11, 13)


def test_voxel_size_rescales_to_the_model_proportions():
    assert volume_scale(None, 28.0, None, (4.0, 1.0, 1.0)) == (1.0, 1.0, 1.0)  # no voxel size: as the model was trained
    assert volume_scale(None, 28.0, (2.0, 1.0, 1.0), None) == (2.0, 1.0, 1.0)  # z twice as coarse as an isotropic model's
    assert volume_scale(None, 28.0, (40.0, 8.0, 8.0), (10.0, 2.0, 2.0)) == (1.0, 1.0, 1.0)  # same proportions, other unit
    assert volume_scale(14.0, 28.0, (1.0, 1.0, 1.0), (2.0, 1.0, 1.0)) == (1.0, 2.0, 2.0)  # diameter halves the objects
    assert check_voxel_size("1,2,3".split(",")) == (1.0, 2.0, 3.0)
    for bad in ([1, 2], [0, 1, 1], ["a", 1, 1], [1, float("nan"), 1]):
        with pytest.raises(InputError, match="voxel size"):
            check_voxel_size(bad)


def test_volume_labels_span_planes_and_follow_the_voxel_size(fake3d):
    volume, truth = blob_volume()
    result = segment_any(fake3d, volume, tile=200)
    assert result.volume and result.labels.shape == volume.shape and result.labels.dtype == np.int32
    assert result.objects == 3  # each ellipsoid is one id through all its planes
    found = [np.unique(result.labels[(truth == i) & (result.labels > 0)]) for i in range(1, 4)]
    assert [len(ids) for ids in found] == [1, 1, 1] and len({int(ids[0]) for ids in found}) == 3
    assert result.output.working_shape == volume.shape and result.inputs.voxel_size is None
    coarse_z = segment_any(fake3d, volume, voxel_size=(2, 1, 1), tile=200)
    assert coarse_z.output.working_shape == (24, 40, 48)  # z stretched to the model's isotropic voxels
    assert coarse_z.labels.shape == volume.shape and coarse_z.objects == 3
    assert "voxel 2:1:1" in coarse_z.inputs.describe()


def test_a_series_of_volumes_runs_volume_by_volume(fake3d):
    volume, _ = blob_volume()
    series = np.stack([volume, volume[:, ::-1]])  # (T,Z,Y,X)
    fractions = []
    result = segment_any(fake3d, series, tile=200, on_progress=fractions.append)
    assert result.volume and result.labels.shape == series.shape and result.objects == 6  # three per time point
    assert len(np.unique(result.labels[0])) == 4 and fractions == sorted(fractions) and fractions[-1] == 1.0
    broken = np.stack([volume, np.full(volume.shape, np.nan)]).astype(np.float32)
    with pytest.raises(InputError, match="volume 1 of the image of shape .*NaN"):
        segment_any(fake3d, broken, tile=200)
    with pytest.raises(InputError, match=r"a 3D model segments \(Z,Y,X\) volumes"):
        segment_any(fake3d, np.zeros((12, 40, 48, 3), np.uint8))  # channels last: not a gray volume


def test_volume_progress_and_cancel(fake3d):
    volume, _ = blob_volume()
    fractions = []
    segment_any(fake3d, volume, tile=200, on_progress=fractions.append)  # 34-voxel cubes: 1 x 2 x 2 tiles
    assert len(fractions) >= 4 and fractions == sorted(fractions) and fractions[-1] == 1.0
    fake3d.model.calls = 0
    with pytest.raises(Stopped):
        segment_any(fake3d, volume, tile=200, should_stop=lambda: fake3d.model.calls >= 1)
    assert fake3d.model.calls == 1  # stopped at the first tile boundary
    assert volume_tile(200) == 34 and volume_tile(1024) == 102


def test_volume_output_is_cached_under_its_voxel_size(fake3d):
    volume, _ = blob_volume()
    store = {}

    def cache(key, compute):
        if key in store:
            return store[key], True
        store[key] = compute()
        return store[key], False

    first = segment_any(fake3d, volume, tile=200, cache=cache)
    again = segment_any(fake3d, volume, tile=200, cache=cache)
    other = segment_any(fake3d, volume, tile=200, cache=cache, voxel_size=(3, 1, 1))
    assert not first.cached and again.cached and not other.cached
    output, cached = plane_output(fake3d, volume, None, tile=200, cache=cache)
    assert cached and output.embedding.shape == (16, *volume.shape)


def test_clear_errors_for_mismatched_models_and_inputs(fake3d, tiny_checkpoint):
    volume, _ = blob_volume()
    with pytest.raises(InputError, match="3D model: it segments .*volumes"):
        segment_any(fake3d, volume, volume=False)
    with pytest.raises(InputError, match=r"a 3D model segments \(Z,Y,X\) volumes; the image has shape \(40, 48\)"):
        segment_any(fake3d, volume[0])
    with pytest.raises(InputError, match="too small to segment as a volume"):
        segment_any(fake3d, volume[:2])
    with pytest.raises(InputError, match="not chosen planes"):
        segment_any(fake3d, volume, planes=[0])
    with pytest.raises(InputError, match="gray values"):
        segment_any(fake3d, volume, channel="hematoxylin")
    with pytest.raises(InputError, match="segment a crop"):
        segment_any(fake3d, volume, voxel_size=(4000, 1, 1))
    flat = ModelSegmenter(tiny_checkpoint)
    with pytest.raises(InputError, match="2D model: it segments a stack plane by plane"):
        segment_any(flat, volume, volume=True)
    with pytest.raises(InputError, match="voxel size applies to volumes"):
        segment_any(flat, volume, voxel_size=(2, 1, 1))
    with pytest.raises(InputError, match="2D model"):
        segment_any(segment.ClassicalSegmenter(), volume, volume=True)


def test_working_volume_is_normalised_as_a_whole():
    volume, _ = blob_volume()
    working = working_volume(volume, invert=True, scale=(2.0, 0.5, 0.5))
    assert working.shape == (24, 20, 24) and working.dtype == np.float32
    assert working[volume.shape[0] // 2 * 2, 5, 6] < 0.2  # a bright blob centre is dark once inverted
