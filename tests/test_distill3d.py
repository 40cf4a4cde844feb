"""Distillation on volumes (B,C,D,H,W): hand-computed 3D values and the identity with 2D on one-slice volumes."""
import pytest
import torch

from napari_graphkd.affinity import OFFSETS
from napari_graphkd.distill import (
    DistillationObjective, MemoryBank, NetOut, agd_loss, igd_loss, instance_nodes, inter_agd_loss, method_weights,
    pooled_gram, resize_labels,
)

OFFSETS_Z0 = [(0, *o) for o in OFFSETS]  # the 2D offsets inside one slice


pytestmark = pytest.mark.usefixtures("one_thread")


def volume_batch(seed: int, depth: int = 1, size: int = 16):
    """Teacher and student embeddings (2,8,depth,size,size) and instance labels (2,depth,size,size)."""
    g = torch.Generator().manual_seed(seed)
    emb_t = torch.randn(2, 8, depth, size, size, generator=g)
    emb_s = torch.randn(2, 8, depth, size, size, generator=g)
    labels = torch.randint(0, 4, (2, depth, size, size), generator=g)
    return emb_t, emb_s, labels


def test_agd_along_z_hand_computed():
    emb_t = torch.zeros(1, 2, 2, 1, 1)
    emb_t[0, 0] = 1.0  # both slices (1, 0): teacher z affinity 1
    emb_s = emb_t.clone()
    emb_s[0, :, 1, 0, 0] = torch.tensor([0.0, 1.0])  # student slice 1 orthogonal: z affinity 0
    # one valid z pair (slice 1 with slice 0): (0 - 1)^2, over B * 2 voxels
    assert agd_loss(emb_t, emb_s, [(-1, 0, 0)]).item() == pytest.approx(0.5)
    # the y offset has no valid pair in a 1-voxel-high volume
    assert agd_loss(emb_t, emb_s, [(0, -1, 0)]).item() == 0.0


def test_igd_nodes_of_a_volume_are_instance_means_hand_computed():
    emb = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)  # C=1, (2,2,2) voxels 0..7
    labels = torch.tensor([[[1, 1], [0, 2]], [[2, 2], [0, 1]]])
    # id 1: voxels 0, 1, 7 -> 8/3 ; id 2: voxels 3, 4, 5 -> 4
    torch.testing.assert_close(instance_nodes(emb, labels), torch.tensor([[8 / 3], [4.0]]))
    small = resize_labels(labels, (1, 1, 2))
    assert small.tolist() == [[[1, 1]]]


def test_one_slice_volumes_give_the_2d_losses():
    emb_t, emb_s, labels = volume_batch(0)
    flat = (emb_t[:, :, 0], emb_s[:, :, 0], labels[:, 0])
    assert agd_loss(emb_t, emb_s, OFFSETS_Z0).item() == pytest.approx(agd_loss(*flat[:2]).item(), rel=1e-6)
    for a, b in zip(igd_loss(emb_t, emb_s, labels), igd_loss(*flat)):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    grams_3d = [pooled_gram(e) for e in emb_t]
    grams_2d = [pooled_gram(e) for e in flat[0]]
    torch.testing.assert_close(grams_3d[0], grams_2d[0])
    assert inter_agd_loss(grams_3d, emb_t, emb_s).item() == pytest.approx(inter_agd_loss(grams_2d, *flat[:2]).item(), rel=1e-6)


def test_grd_objective_on_one_slice_volumes_equals_2d_and_runs_on_volumes():
    """Every GRD term (intra and inter, memory bank included) gives the 2D numbers on 1-slice volumes."""
    runs = {}
    for dims in ("2d", "3d"):
        objective = DistillationObjective(method_weights("grd"), MemoryBank(4, 2), generator=torch.Generator().manual_seed(0),
                                          offsets=OFFSETS_Z0 if dims == "3d" else None)
        parts = []
        for step in range(3):
            emb_t, emb_s, labels = volume_batch(step)
            if dims == "2d":
                emb_t, emb_s, labels = emb_t[:, :, 0], emb_s[:, :, 0], labels[:, 0]
            _, p = objective(NetOut(emb_s), NetOut(emb_t), labels, [f"{step}a", f"{step}b"])
            parts.append(p)
        runs[dims] = parts
    assert set(runs["3d"][-1]) == {"affinity", "node", "edge", "inter_affinity", "inter_edge"}
    for p2, p3 in zip(runs["2d"], runs["3d"]):
        assert p2.keys() == p3.keys()
        for k in p2:
            assert p3[k] == pytest.approx(p2[k], rel=1e-5), k


def test_grd_objective_backpropagates_on_a_real_volume_batch():
    emb_t, emb_s, labels = volume_batch(5, depth=6, size=12)
    emb_s.requires_grad_(True)
    objective = DistillationObjective(method_weights("grd"), MemoryBank(4, 2), generator=torch.Generator().manual_seed(0))
    objective(NetOut(emb_s.detach()), NetOut(emb_t), labels, ["a", "b"])  # fills the memory bank
    total, parts = objective(NetOut(emb_s), NetOut(emb_t), labels.flip(1), ["c", "d"])
    total.backward()
    assert parts["inter_edge"] > 0 and parts["affinity"] > 0 and emb_s.grad.abs().sum() > 0
    assert objective.memory_bank.items()[0].embedding.shape == (8, 6, 12, 12)
