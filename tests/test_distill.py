"""Distillation losses, memory bank and objective: real properties on tiny tensors."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_graphkd.distill import (
    Adapter,
    DistillationObjective,
    DistillWeights,
    MemoryBank,
    NetOut,
    agd_loss,
    attention_transfer_loss,
    batch_nodes,
    cwd_loss,
    distillation_resolutions,
    edge_loss,
    edge_matrix,
    igd_loss,
    instance_nodes,
    inter_agd_loss,
    pooled_gram,
    inter_igd_loss,
    make_adapter,
    match_stages,
    method_weights,
    mimic_loss,
    node_loss,
    resize_labels,
    skd_pairwise_loss,
)
from napari_graphkd.models import EmbeddingUNet, UNetConfig

B, C, H, W = 2, 16, 32, 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin contention with other jobs on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
GRD_PARTS = {"affinity", "node", "edge", "inter_affinity", "inter_edge"}


def square_labels() -> torch.Tensor:
    """(2,32,32) label maps with a few square instances and non-contiguous ids."""
    lab = torch.zeros(B, H, W, dtype=torch.long)
    lab[0, 2:10, 2:10] = 1
    lab[0, 12:20, 5:15] = 2
    lab[0, 22:30, 20:30] = 3
    lab[1, 4:12, 18:28] = 5
    lab[1, 16:28, 2:12] = 7
    return lab


def val(x: torch.Tensor) -> float:
    return float(x.detach())


def randn(*shape, seed: int, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def memory_nodes(n_items: int = 2, seed: int = 50) -> list[torch.Tensor]:
    return [randn(3 + i, C, seed=seed + i, grad=False) for i in range(n_items)]


# Each case maps (teacher, student) tensors of one shape to a scalar loss.
LOSSES = {
    "agd": ((B, C, H, W), lambda t, s: agd_loss(t, s)),
    "igd_node": ((B, C, H, W), lambda t, s: igd_loss(t, s, square_labels())[0]),
    "igd_edge": ((B, C, H, W), lambda t, s: igd_loss(t, s, square_labels())[1]),
    "inter_node": (
        (B, C, H, W),
        lambda t, s: inter_igd_loss(batch_nodes(t, square_labels()), batch_nodes(s, square_labels()), memory_nodes())[0],
    ),
    "inter_edge": (
        (B, C, H, W),
        lambda t, s: inter_igd_loss(batch_nodes(t, square_labels()), batch_nodes(s, square_labels()), memory_nodes())[1],
    ),
    "inter_agd": ((B, C, H, W), lambda t, s: inter_agd_loss([pooled_gram(randn(C, H, W, seed=60, grad=False))], t, s)),
    "mimic": ((B, C, H, W), lambda t, s: mimic_loss(s, t)),
    "at": ((B, 8, 16, 16), lambda t, s: attention_transfer_loss(s, t)),
    "skd": ((B, 8, 16, 16), lambda t, s: skd_pairwise_loss(s, t, pool=4)),
    "cwd": ((B, 8, 16, 16), lambda t, s: cwd_loss(s, t)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_zero_iff_student_equals_teacher(name):
    shape, fn = LOSSES[name]
    teacher = randn(*shape, seed=1)
    same = fn(teacher, teacher.detach().clone().requires_grad_(True))
    assert abs(val(same)) < 1e-6
    other = fn(teacher, randn(*shape, seed=2))
    assert val(other) > 1e-4


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_reaches_student_never_teacher(name):
    shape, fn = LOSSES[name]
    teacher, student = randn(*shape, seed=3), randn(*shape, seed=4)
    fn(teacher, student).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_node_loss_gradient_is_finite_at_zero_distance():
    v = randn(3, C, seed=5)
    node_loss(v.detach(), v).backward()
    assert torch.isfinite(v.grad).all()


def test_instance_nodes_and_losses_hand_computed():
    labels = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0]])
    teacher = torch.zeros(2, 3, 4)
    teacher[0, :2, :2] = 1.0  # instance 1 -> (1, 0)
    teacher[1, :2, 2:] = 1.0  # instance 2 -> (0, 1)
    teacher[:, 2] = 100.0  # background is ignored
    student = torch.zeros(2, 3, 4)
    student[:, :2, :2] = 4.0  # instance 1 -> (4, 4): distance 5 to (1, 0)
    student[1, :2, 2] = 1.0
    student[1, :2, 3] = 3.0  # instance 2 -> (0, 2): distance 1 to (0, 1)
    student[:, 2] = -50.0
    vt, vs = instance_nodes(teacher, labels), instance_nodes(student, labels)
    assert torch.allclose(vt, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(vs, torch.tensor([[4.0, 4.0], [0.0, 2.0]]))
    assert val(node_loss(vt, vs)) == pytest.approx(3.0)  # (5 + 1) / 2
    # cosines: teacher identity, student off-diagonal 1/sqrt(2) -> 2 * 0.5 / 4 entries
    assert torch.allclose(edge_matrix(vs), torch.tensor([[1.0, 0.5**0.5], [0.5**0.5, 1.0]]), atol=1e-6)
    assert val(edge_loss(vt, vs)) == pytest.approx(0.25, abs=1e-6)


def test_edge_matrix_gradient_flows_through_numerator_only():
    v = randn(2, 3, seed=6)
    edge_matrix(v)[0, 0].backward()  # with live norms d(cos(v,v))/dv = 0; numerator-only gives 2 v/|v|^2
    expected = 2 * v.detach()[0] / (v.detach()[0].norm() + 1e-8) ** 2
    assert torch.allclose(v.grad[0], expected, atol=1e-5)


def test_igd_invariant_to_permuting_instance_ids():
    labels = square_labels()
    perm = {1: 3, 2: 1, 3: 2, 5: 100, 7: 4}
    relabelled = labels.clone()
    for old, new in perm.items():
        relabelled[labels == old] = new
    t, s = randn(B, C, H, W, seed=7), randn(B, C, H, W, seed=8)
    for a, b in zip(igd_loss(t, s, labels), igd_loss(t, s, relabelled)):
        assert val(a) == pytest.approx(val(b), rel=1e-6)


def test_igd_without_instances_is_zero_and_backward_works():
    s = randn(B, C, H, W, seed=9)
    node, edge = igd_loss(randn(B, C, H, W, seed=10), s, torch.zeros(B, H, W, dtype=torch.long))
    assert val(node) == 0 and val(edge) == 0
    (node + edge).backward()
    assert s.grad is not None and val(s.grad.abs().sum()) == 0


def test_igd_averages_only_over_images_with_instances():
    labels = square_labels()
    labels[1] = 0
    t, s = randn(B, C, H, W, seed=11), randn(B, C, H, W, seed=12)
    node, edge = igd_loss(t, s, labels)
    node0, edge0 = igd_loss(t[:1], s[:1], labels[:1])
    assert val(node) == pytest.approx(val(node0)) and val(edge) == pytest.approx(val(edge0))


def test_resize_labels_matches_torch_nearest_and_keeps_ids():
    labels = torch.randint(0, 1000, (1, 30, 22))
    for size in [(15, 11), (64, 40), (7, 9)]:
        ours = resize_labels(labels, size)
        ref = F.interpolate(labels[None].float(), size=size, mode="nearest")[0].long()
        assert torch.equal(ours, ref)
    big = torch.arange(2**25, 2**25 + 4).reshape(2, 2)  # ids not representable in float32
    assert set(resize_labels(big, (4, 4)).unique().tolist()) == set(big.flatten().tolist())


def test_instance_nodes_resizes_labels_to_embedding():
    labels = square_labels()[0]
    emb = randn(C, H // 2, W // 2, seed=13, grad=False)
    small = labels[::2, ::2]
    assert torch.allclose(instance_nodes(emb, labels), instance_nodes(emb, small))


def test_agd_equals_bruteforce_over_valid_pairs_only():
    offsets = [(-1, 0), (0, -3)]
    t, s = randn(1, 4, 5, 6, seed=14, grad=False), randn(1, 4, 5, 6, seed=15, grad=False)
    nt, ns = F.normalize(t, dim=1)[0], F.normalize(s, dim=1)[0]
    total = 0.0
    for dy, dx in offsets:
        for y in range(5):
            for x in range(6):
                if 0 <= y + dy < 5 and 0 <= x + dx < 6:  # no wrap-around partner
                    ct = val(nt[:, y, x] @ nt[:, y + dy, x + dx])
                    cs = val(ns[:, y, x] @ ns[:, y + dy, x + dx])
                    total += (cs - ct) ** 2
    assert val(agd_loss(t, s, offsets)) == pytest.approx(total / (5 * 6), rel=1e-5)


def test_inter_igd_has_no_cumulative_concatenation():
    labels = square_labels()
    t, s = randn(B, C, H, W, seed=16), randn(B, C, H, W, seed=17)
    nt, ns = batch_nodes(t, labels), batch_nodes(s, labels)
    u1, u2 = memory_nodes(2)
    node12, edge12 = inter_igd_loss(nt, ns, [u1, u2])
    node1, edge1 = inter_igd_loss(nt, ns, [u1])
    node2, edge2 = inter_igd_loss(nt, ns, [u2])
    assert val(edge12) == pytest.approx((val(edge1) + val(edge2)) / 2, rel=1e-6)
    assert val(node12) == pytest.approx((val(node1) + val(node2)) / 2, rel=1e-6)
    # and each pair is the plain bipartite mean (no factor 2)
    vt, vs = nt[0], ns[0]
    cos = lambda a, b: F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    ref = ((cos(vt, u1) - cos(vs, u1)) ** 2).mean()
    assert val(inter_igd_loss(nt[:1], ns[:1], [u1])[1]) == pytest.approx(val(ref), rel=1e-5)


def test_inter_agd_is_a_mean_over_memory_items():
    t, s = randn(B, C, H, W, seed=18), randn(B, C, H, W, seed=19)
    m1, m2 = randn(C, H, W, seed=20, grad=False), randn(C, 21, 26, seed=21, grad=False)
    both = inter_agd_loss([pooled_gram(m1), pooled_gram(m2)], t, s)
    singles = [val(inter_agd_loss([pooled_gram(m)], t, s)) for m in (m1, m2)]
    assert val(both) == pytest.approx(sum(singles) / 2, rel=1e-6)


def test_feature_baselines_accept_different_channels_and_sizes():
    t, s = randn(B, 32, 16, 16, seed=22), randn(B, 8, 8, 8, seed=23)
    assert val(attention_transfer_loss(s, t)) > 0
    assert val(skd_pairwise_loss(s, t, pool=4)) > 0
    with pytest.raises(ValueError, match="Adapter"):
        cwd_loss(s, t)
    adapter = Adapter(8, 32)
    cwd_loss(adapter(s), t).backward()
    assert adapter.proj.weight.grad is not None and t.grad is None


# ---------------------------------------------------------------- memory bank


def push_items(bank: MemoryBank, ids: list) -> None:
    emb = randn(len(ids), C, 8, 8, seed=len(ids))
    labels = torch.zeros(len(ids), 8, 8, dtype=torch.long)
    labels[:, 2:5, 2:5] = 1
    bank.push(emb, labels, ids)


def test_memory_bank_fifo_keeps_the_last_items():
    bank = MemoryBank(size=3, sample_count=2)
    push_items(bank, ["a", "b"])
    push_items(bank, ["c", "d", "e"])
    assert len(bank) == 3
    assert [m.image_id for m in bank.items()] == ["c", "d", "e"]
    bank.clear()
    assert len(bank) == 0 and bank.sample() == []


def test_memory_bank_stores_detached_half_precision_and_nodes():
    bank = MemoryBank(size=4)
    emb = randn(1, C, 8, 8, seed=24)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 1:4, 1:4], labels[0, 5:8, 5:8] = 3, 9
    bank.push(emb, labels, [0])
    item = bank.items()[0]
    assert item.embedding.dtype == torch.float16 and not item.embedding.requires_grad
    assert not item.nodes.requires_grad and item.nodes.shape == (2, C)
    assert torch.allclose(item.nodes, instance_nodes(emb[0].detach(), labels[0]))


def test_memory_bank_sampling_rules():
    bank = MemoryBank(size=8, sample_count=3)
    push_items(bank, list(range(6)))
    for _ in range(20):
        got = [m.image_id for m in bank.sample(exclude_ids=[1, 4])]
        assert len(got) == 3 and len(set(got)) == 3 and not {1, 4} & set(got)
    assert len(bank.sample(k=10, exclude_ids=[0])) == 5  # min(k, eligible)
    assert bank.sample(exclude_ids=range(6)) == []
    first = [m.image_id for m in bank.sample(k=4, generator=torch.Generator().manual_seed(7))]
    again = [m.image_id for m in bank.sample(k=4, generator=torch.Generator().manual_seed(7))]
    assert first == again


# ---------------------------------------------------------------- objective


def outs(seed: int = 30) -> tuple[NetOut, NetOut]:
    """(student, teacher) outputs with random full-resolution embeddings."""
    return NetOut(randn(B, C, H, W, seed=seed + 1)), NetOut(randn(B, C, H, W, seed=seed))


def test_method_weights_and_unknown_method():
    assert method_weights("grd") == DistillWeights()
    assert set(method_weights("grd-intra").active()) == {"affinity", "node", "edge"}
    assert method_weights("none").active() == {}
    for name in ("mimic", "at", "skd", "cwd"):
        assert set(method_weights(name).active()) == {name}
    with pytest.raises(ValueError, match="unknown"):
        method_weights("kd")
    with pytest.raises(ValueError):
        DistillWeights(node=-1)
    assert set(distillation_resolutions()) == set(DistillWeights().__dataclass_fields__)


def test_objective_none_is_zero_with_no_parts():
    total, parts = DistillationObjective(method_weights("none"))(*outs(), square_labels(), [0, 1])
    assert val(total) == 0 and parts == {}


def test_objective_grd_parts_and_inter_terms_after_first_batch():
    bank = MemoryBank(size=8, sample_count=4)
    objective = DistillationObjective(method_weights("grd"), bank)
    _, parts = objective(*outs(30), square_labels(), ["img0", "img1"])
    assert set(parts) == {"affinity", "node", "edge"}  # empty bank: no inter terms yet
    assert len(bank) == 2  # pushed after the inter terms
    student, teacher = outs(32)
    total, parts = objective(student, teacher, square_labels().numpy().astype(np.uint16), ["img2", "img3"])
    assert set(parts) == GRD_PARTS and all(v > 0 for v in parts.values())
    expected = sum(getattr(DistillWeights(), k) * v for k, v in parts.items())
    assert val(total) == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert teacher.embedding.grad is None and student.embedding.grad is not None


def test_objective_never_distills_against_the_current_image():
    objective = DistillationObjective(method_weights("grd"), MemoryBank())
    objective(*outs(30), square_labels(), ["x", "y"])
    _, parts = objective(*outs(32), square_labels(), ["x", "y"])
    assert not {"inter_affinity", "inter_edge"} & set(parts)  # the bank holds only x and y
    _, parts = objective(*outs(34), square_labels(), ["x", "z"])
    assert {"inter_affinity", "inter_edge"} <= set(parts)  # y is eligible now


def test_objective_zero_weight_removes_part():
    base = method_weights("grd")
    for name in GRD_PARTS:
        objective = DistillationObjective(replace(base, **{name: 0.0}), MemoryBank())
        objective(*outs(30), square_labels(), [0, 1])
        _, parts = objective(*outs(32), square_labels(), [2, 3])
        assert set(parts) == GRD_PARTS - {name}
    grd_intra = DistillationObjective(method_weights("grd-intra"))
    assert grd_intra.memory_bank is None


def test_objective_equal_outputs_give_zero():
    objective = DistillationObjective(method_weights("grd"), MemoryBank())
    _, teacher = outs(30)
    objective(NetOut(teacher.embedding.detach().clone()), teacher, square_labels(), [0, 1])
    _, teacher = outs(32)
    total, parts = objective(NetOut(teacher.embedding.detach().clone()), teacher, square_labels(), [2, 3])
    assert set(parts) == GRD_PARTS and abs(val(total)) < 1e-6


@pytest.mark.parametrize("method", ["mimic", "at", "skd", "cwd"])
def test_baselines_through_objective_with_real_networks(method):
    torch.manual_seed(0)
    teacher_net = EmbeddingUNet(UNetConfig(widths=(8, 16, 32), foreground_head=False))
    student_net = EmbeddingUNet(UNetConfig(widths=(4, 6, 8), stem_stride=2, foreground_head=False))
    for p in teacher_net.parameters():
        p.requires_grad_(False)
    x = torch.rand(B, 1, H, W)
    emb_t, _, feats_t = teacher_net.forward_padded(x)
    emb_s, _, feats_s = student_net.forward_padded(x)
    assert emb_s.shape == emb_t.shape == (B, C, H, W)  # half-res student compared at input size
    pairs = match_stages(feats_s, feats_t)
    assert [tuple(s.shape[-2:]) for s, _ in pairs] == [(8, 8), (16, 16)]  # student 16,8,4 vs teacher 32,16,8
    assert all(s.shape[-2:] == t.shape[-2:] for s, t in pairs)
    adapter = make_adapter(feats_s, feats_t) if method == "cwd" else None
    objective = DistillationObjective(method_weights(method), adapter=adapter)
    assert objective.needs_features == (method != "mimic")
    total, parts = objective(NetOut(emb_s, feats_s), NetOut(emb_t, feats_t), square_labels(), [0, 1])
    assert set(parts) == {method} and val(total) > 0
    total.backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    stem = student_net.stem[0].weight  # feature baselines act before the embedding head
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    if adapter is not None:
        assert adapter.proj.weight.grad is not None


def test_objective_computes_in_float32_under_autocast():
    student, teacher = outs(30)
    s16, t16 = student.embedding.detach().bfloat16(), teacher.embedding.detach().bfloat16()
    objective = DistillationObjective(method_weights("grd-intra"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = objective(NetOut(s16), NetOut(t16), square_labels(), [0, 1])
    ref_total, ref_parts = objective(NetOut(s16.float()), NetOut(t16.float()), square_labels(), [0, 1])
    assert total.dtype == torch.float32
    assert parts == pytest.approx(ref_parts, rel=1e-6)


def test_inter_agd_gram_form_equals_the_explicit_cross_image_affinity_matrices():
    """mean_{p,q} (C^S - C^T)^2 with C = P_m P^T (docs/method.md, "Distillation"), computed the slow explicit way."""
    import torch.nn.functional as F

    t, s = randn(2, C, 30, 23, seed=71), randn(2, C, 30, 23, seed=72)
    memory = randn(C, 41, 19, seed=73)

    def pooled(e):
        return F.avg_pool2d(F.normalize(e, dim=1), 7, stride=7, ceil_mode=True).flatten(2).transpose(1, 2)

    p_m, p_t, p_s = pooled(memory[None])[0], pooled(t), pooled(s)
    explicit = torch.stack([((p_m @ p_s[b].t() - p_m @ p_t[b].t()) ** 2).mean() for b in range(2)]).mean()
    torch.testing.assert_close(inter_agd_loss([pooled_gram(memory)], t, s), explicit, rtol=1e-5, atol=1e-8)
