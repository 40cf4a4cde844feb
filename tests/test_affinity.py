"""Affinities and the segmentation loss on hand-computed cases."""
import numpy as np
import pytest
import torch

from napari_graphkd.affinity import (
    OFFSETS,
    affinity_loss,
    balance_weights,
    embedding_affinities,
    label_affinities,
    offsets_for,
    validity_mask,
)


def test_offsets_are_the_ten_of_the_paper():
    assert len(OFFSETS) == 10
    assert sorted(max(abs(dy), abs(dx)) for dy, dx in OFFSETS) == [1, 1, 3, 3, 5, 5, 9, 9, 27, 27]


def test_validity_mask_has_no_wraparound():
    valid = validity_mask((4, 5), [(-1, 0), (0, -3), (2, 1)])
    assert not valid[0, 0].any() and valid[0, 1:].all()
    assert not valid[1, :, :3].any() and valid[1, :, 3:].all()
    # (2, 1): partner is two rows down and one column right
    assert valid[2, :2, :4].all() and not valid[2, 2:].any() and not valid[2, :, 4].any()


def test_label_affinities_hand_computed():
    labels = np.array([[0, 1, 1], [0, 2, 2]])
    target, valid = label_affinities(labels, [(0, -1), (-1, 0)])
    # (0,-1): left neighbour. Row 0: x=1 pairs (1,0) -> 0; x=2 pairs (1,1) -> 1.
    np.testing.assert_array_equal(target[0], [[0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(valid[0], [[0, 1, 1], [0, 1, 1]])
    # (-1,0): upper neighbour. Row 1: (0,0) bg-bg -> 1; (2,1) -> 0; (2,1) -> 0.
    np.testing.assert_array_equal(target[1], [[0, 0, 0], [1, 0, 0]])


def test_embedding_affinities_are_cosines_without_wraparound():
    emb = torch.zeros(1, 2, 1, 3)
    emb[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    emb[0, :, 0, 1] = torch.tensor([2.0, 0.0])  # same direction, other norm
    emb[0, :, 0, 2] = torch.tensor([0.0, -3.0])  # orthogonal
    aff = embedding_affinities(emb, [(0, -1), (0, 2)])
    torch.testing.assert_close(aff[0, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(aff[0, 1, 0], torch.tensor([0.0, 0.0, 0.0]))
    emb[0, :, 0, 2] = torch.tensor([-1.0, 0.0])  # opposite
    aff = embedding_affinities(emb, [(0, -1)])
    torch.testing.assert_close(aff[0, 0, 0], torch.tensor([0.0, 1.0, -1.0]))


def test_strided_long_range_affinities_equal_the_dense_ones_on_the_decoder_grid():
    """Decoding computes long-range cosines only on the stride grid it reads; 1-px ones stay dense."""
    from napari_graphkd.affinity import _slices

    emb = torch.randn(1, 4, 30, 41)
    with torch.no_grad():
        dense, strided = embedding_affinities(emb)[0], embedding_affinities(emb, OFFSETS, 4)[0]
    for k, offset in enumerate(OFFSETS):
        if max(abs(o) for o in offset) == 1:
            torch.testing.assert_close(strided[k], dense[k])
            continue
        here, _ = _slices(offset, (30, 41))
        grid = tuple(slice(s.start, s.stop, 4) for s in here)
        torch.testing.assert_close(strided[k][grid], dense[k][grid])
        assert strided[k].count_nonzero() == strided[k][grid].count_nonzero() > 0


def test_decoding_and_training_affinities_agree_with_the_normalised_dot_product():
    """The in-place path (no autograd, used by the decoder) and the autograd path give the same cosines."""
    emb = torch.randn(2, 5, 9, 11)
    unit = torch.nn.functional.normalize(emb, dim=1)
    with torch.no_grad():
        decoding = embedding_affinities(emb)
    training = embedding_affinities(emb.clone().requires_grad_(True))
    k = OFFSETS.index((-3, 0))
    torch.testing.assert_close(decoding[:, k, 3:], (unit[:, :, 3:] * unit[:, :, :-3]).sum(1))
    torch.testing.assert_close(training.detach(), decoding)
    assert training.requires_grad


def test_balance_weights_hand_computed():
    # 3 valid pairs, 1 positive: f = 1/3 < 0.5 -> positives get (1-f)/f = 2, negatives 1.
    target = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[[True, True, True, False]]])
    torch.testing.assert_close(balance_weights(target, valid), torch.tensor([[[2.0, 1.0, 1.0, 0.0]]]))


def test_affinity_loss_hand_computed():
    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])  # B=1,K=1,H=1,W=4
    valid = torch.tensor([[[[True, True, True, False]]]])
    aff = torch.tensor([[[[0.5, 0.5, -1.0, 7.0]]]])
    # weights 2,1,1,0 ; squared errors .25,.25,1,49 -> (0.5 + 0.25 + 1) / (1*1*4)
    assert affinity_loss(aff, target, valid).item() == pytest.approx(1.75 / 4)


def test_affinity_loss_is_zero_for_perfect_embedding_and_has_gradients():
    labels = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 2]])
    onehot = torch.from_numpy(np.eye(3, dtype=np.float32)[labels]).permute(2, 0, 1)[None]
    target, valid = label_affinities(labels)
    t, v = torch.from_numpy(target)[None], torch.from_numpy(valid)[None]
    assert affinity_loss(embedding_affinities(onehot), t, v).item() == pytest.approx(0.0, abs=1e-7)
    emb = torch.randn(1, 16, 3, 4, requires_grad=True)
    loss = affinity_loss(embedding_affinities(emb), t, v)
    loss.backward()
    assert loss.item() > 0 and emb.grad.abs().sum() > 0


def test_unannotated_pixels_are_left_out_of_the_targets():
    labels = np.array([[1, 1, -1], [0, 0, -1]])
    target, valid = label_affinities(labels, [(0, -1), (-1, 0)])
    # left-neighbour pairs touching column 2 (unknown) are invalid, the rest keep their meaning
    np.testing.assert_array_equal(valid[0], [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(target[0], [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(valid[1], [[0, 0, 0], [1, 1, 0]])


# ---- volumes (z, y, x) ----

def test_default_offsets_in_2d_are_the_paper_ones_and_in_3d_add_z():
    assert offsets_for(2) == OFFSETS
    iso = offsets_for(3)
    assert len(iso) == 15 and iso[:3] == ((-1, 0, 0), (0, -1, 0), (0, 0, -1)) and iso[-1] == (0, 0, -27)
    # anisotropy 4: z shifts 1,3,5,9,27 -> max(1, round(s/4)) = 1,1,1,2,7, duplicates dropped
    coarse_z = offsets_for(3, anisotropy=4.0)
    assert [o[0] for o in coarse_z if o[0]] == [-1, -2, -7] and len(coarse_z) == 13
    with pytest.raises(ValueError):
        offsets_for(4)


def test_validity_mask_of_z_offsets_at_the_volume_borders():
    valid = validity_mask((3, 2, 2), [(-2, 0, 0), (1, 0, -1)])
    assert not valid[0, :2].any() and valid[0, 2].all()  # z - 2 exists only for z = 2
    # (1,0,-1): partner one slice up and one column left: z < 2 and x >= 1
    np.testing.assert_array_equal(valid[1, :, 0], [[0, 1], [0, 1], [0, 0]])


def test_label_affinities_of_a_tiny_volume_hand_computed():
    labels = np.array([[[1, 1, 0]], [[1, 2, 0]]])  # (z=2, y=1, x=3)
    target, valid = label_affinities(labels, [(-1, 0, 0), (0, 0, -1)])
    # z neighbour (slice below): z=1 pairs (1,1)=1, (2,1)=0, (0,0)=1; z=0 invalid
    np.testing.assert_array_equal(target[0], [[[0, 0, 0]], [[1, 0, 1]]])
    np.testing.assert_array_equal(valid[0], [[[0, 0, 0]], [[1, 1, 1]]])
    # x neighbour (left): z=0: (1,1)=1, (0,1)=0 ; z=1: (2,1)=0, (0,2)=0
    np.testing.assert_array_equal(target[1], [[[0, 1, 0]], [[0, 0, 0]]])
    with pytest.raises(ValueError, match="3D"):
        label_affinities(labels, [(-1, 0)])


def test_embedding_affinities_along_z_are_cosines():
    emb = torch.zeros(1, 2, 3, 1, 1)
    emb[0, :, 0, 0, 0] = torch.tensor([1.0, 0.0])
    emb[0, :, 1, 0, 0] = torch.tensor([3.0, 3.0])  # 45 degrees from slice 0
    emb[0, :, 2, 0, 0] = torch.tensor([0.0, -2.0])  # 135 degrees from slice 1
    c = 2**-0.5
    for grad in (False, True):
        aff = embedding_affinities(emb.clone().requires_grad_(grad), [(-1, 0, 0), (-2, 0, 0)])
        torch.testing.assert_close(aff[0, 0, :, 0, 0].detach(), torch.tensor([0.0, c, -c]))
        torch.testing.assert_close(aff[0, 1, :, 0, 0].detach(), torch.tensor([0.0, 0.0, 0.0]))


def test_class_balanced_loss_on_a_tiny_volume_hand_computed():
    labels = np.array([[[1, 2]], [[1, 1]]])  # (2,1,2)
    target, valid = label_affinities(labels, [(-1, 0, 0)])
    np.testing.assert_array_equal(target[0, 1], [[1, 0]])  # the two z pairs: same, different
    t, v = torch.from_numpy(target)[None], torch.from_numpy(valid)[None]
    aff = torch.tensor([0.0, 0.0, 0.5, 0.5]).reshape(1, 1, 2, 1, 2)
    # f = 1/2 -> both weights 1; errors (0.5-1)^2 + (0.5-0)^2 = 0.5, over B * 4 voxels
    assert affinity_loss(aff, t, v).item() == pytest.approx(0.5 / 4)


def test_a_one_slice_volume_gives_the_2d_targets_and_loss():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (6, 7))
    offsets_2d = [(-1, 0), (0, -1), (0, -3)]
    offsets_3d = [(0, *o) for o in offsets_2d]
    t2, v2 = label_affinities(labels, offsets_2d)
    t3, v3 = label_affinities(labels[None], offsets_3d)
    np.testing.assert_array_equal(t3[:, 0], t2)
    emb = torch.randn(2, 4, 6, 7)
    a2, a3 = embedding_affinities(emb, offsets_2d), embedding_affinities(emb[:, :, None], offsets_3d)
    torch.testing.assert_close(a3[:, :, 0], a2)
    l2 = affinity_loss(a2, torch.from_numpy(t2)[None].repeat(2, 1, 1, 1), torch.from_numpy(v2)[None].repeat(2, 1, 1, 1))
    l3 = affinity_loss(a3, torch.from_numpy(t3)[None].repeat(2, 1, 1, 1, 1), torch.from_numpy(v3)[None].repeat(2, 1, 1, 1, 1))
    assert l3.item() == pytest.approx(l2.item())


def test_strided_long_range_affinities_in_3d_equal_the_dense_ones_on_the_grid():
    from napari_graphkd.affinity import _slices

    emb = torch.randn(1, 3, 7, 9, 10)
    offsets = [(-1, 0, 0), (-3, 0, 0), (0, -5, 0)]
    with torch.no_grad():
        dense, strided = embedding_affinities(emb, offsets)[0], embedding_affinities(emb, offsets, 2)[0]
    torch.testing.assert_close(strided[0], dense[0])
    for k in (1, 2):
        grid = tuple(slice(s.start, s.stop, 2) for s in _slices(offsets[k], (7, 9, 10))[0])
        torch.testing.assert_close(strided[k][grid], dense[k][grid])
        assert strided[k].count_nonzero() == strided[k][grid].count_nonzero() > 0
