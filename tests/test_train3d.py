"""Training and distillation on volumes: y-x-only augmentation, a tiny 3D teacher learns, a GRD step on volumes."""
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_graphkd.affinity import offsets_for, offsets_from_metadata
from napari_graphkd.data import AugmentConfig, Sample
from napari_graphkd.distill import method_weights
from napari_graphkd.io.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.train.distill import DistillSettings, compute_teacher_targets, distill_batches, distill_volume_student
from napari_graphkd.train.loop import TrainSettings, run_training, segmentation_loss, training_autocast
from napari_graphkd.train.segmentation import train_volumes
from napari_graphkd.train.volumes import augment_volume, volume_offsets, volume_sample

NO_JITTER = AugmentConfig(noise_std=0, renormalize_prob=0, gamma_range=(1, 1), gain_range=(1, 1), offset_range=(0, 0),
                          blur_prob=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def blob_volume(seed: int, shape=(12, 32, 32), n: int = 6) -> Sample:
    """Synthetic nuclei volume: bright balls (radius 3-5 voxels) on a noisy background, touching ones kept apart."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    zz, yy, xx = np.indices(shape)
    for i in range(1, n + 1):
        c, r = rng.uniform([2, 4, 4], np.subtract(shape, [2, 4, 4])), rng.uniform(3, 5)
        ball = ((zz - c[0]) * 2) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r  # z voxels twice as long
        labels[ball & (labels == 0)] = i
    image = ndi.gaussian_filter((labels > 0).astype(np.float32), 0.7) + rng.normal(0.1, 0.03, shape).astype(np.float32)
    return Sample(f"v{seed}", np.clip(image, 0, None), labels)


def test_volume_augmentation_turns_y_x_only():
    z_index = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 10, 10)).copy()
    labels = np.arange(600, dtype=np.int32).reshape(6, 10, 10)
    seen_turns = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        img, lab = augment_volume(z_index, labels, NO_JITTER, (4, 8, 8), rng)
        assert img.shape == lab.shape == (4, 8, 8)
        z0 = int(img[0, 0, 0])
        np.testing.assert_array_equal(img[:, 0, 0], np.arange(z0, z0 + 4))  # z never flipped
        assert ((lab // 100) == img).all()  # every voxel stays in its slice
        seen_turns.add(tuple(np.sign(np.diff(lab[0, 0])).tolist()[:1] + np.sign(np.diff(lab[0, :, 0])).tolist()[:1]))
    assert len(seen_turns) > 2  # quarter turns and mirrors happen in y-x
    img, lab = augment_volume(z_index, labels + 1, NO_JITTER, (8, 12, 12), np.random.default_rng(0))  # larger than the volume
    assert img.shape == (8, 12, 12) and np.count_nonzero(lab) == 600 and (lab[6:] == 0).all()  # padding is background


def test_stored_volumes_become_normalised_samples():
    raw = (np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8) * 10)
    sample = volume_sample("v", raw, np.ones((4, 8, 8), dtype=np.uint16))
    assert sample.image.dtype == np.float32 and sample.labels.dtype == np.int32
    assert np.percentile(sample.image, 50) == pytest.approx(0.5, abs=0.05)  # percentiles map to 0..1
    with pytest.raises(ValueError, match="Z,Y,X"):
        volume_sample("v", raw[0], raw[0])


def test_voxel_size_sets_the_z_offsets():
    assert volume_offsets(None) == offsets_for(3)
    assert volume_offsets((30.0, 10.0, 10.0)) == offsets_for(3, 3.0)
    with pytest.raises(ValueError):
        volume_offsets((1.0, 0.0, 1.0))


def test_a_tiny_3d_teacher_learns_on_a_synthetic_volume(tmp_path):
    volumes = [blob_volume(0), blob_volume(1)]
    settings = TrainSettings(steps=12, batch_size=2, lr=1e-2, warmup=2, save_every=12, snapshot_every=1000,
                             augment=NO_JITTER)
    torch.manual_seed(0)
    progress = train_volumes(volumes, tmp_path / "run", UNetConfig(widths=(8, 16), ndim=3), settings,
                             crop=(8, 16, 16), voxel_size=(2.0, 1.0, 1.0))
    losses = [r["loss"] for r in progress["history"]]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    model, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert model.config.ndim == 3 and meta["voxel_size"] == [2.0, 1.0, 1.0]
    assert offsets_from_metadata(meta) == offsets_for(3, 2.0)


def test_3d_training_steps_give_repeatable_finite_gradients_on_small_deep_levels():
    """A 3-level 3D network on a 4x16x16 crop (1x4x4 deepest level): under bf16 autocast on CPU its weight
    gradients came back at random as garbage up to 1e36 (the NaN of 3D training); the training step must not."""
    torch.manual_seed(0)
    model = build_model(UNetConfig(widths=(8, 16, 24), ndim=3)).train()
    sample = blob_volume(0, shape=(4, 16, 16), n=3)
    images = torch.from_numpy(sample.image[None, None].repeat(2, 0))
    norms = []
    for _ in range(6):
        model.zero_grad()
        with training_autocast(model, TrainSettings()):
            emb, fg = model(images)
            loss, _ = segmentation_loss(emb, fg, np.stack([sample.labels] * 2), 1.0)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
    assert np.isfinite(norms).all() and norms[0] < 100 and len(set(norms)) == 1


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(UNetConfig(widths=(2, 4), ndim=3))
    sample = blob_volume(0, shape=(4, 8, 8), n=2)
    weights = {}

    def step_loss(net, batch):
        emb, fg = net(torch.from_numpy(sample.image[None, None]))
        loss, parts = segmentation_loss(emb, fg, sample.labels[None], 1.0)
        if len(weights) == 1:  # the second step: a NaN loss
            loss = loss * float("nan")
        weights[len(weights)] = {k: v.detach().clone() for k, v in net.named_parameters()}  # BN statistics move anyway
        return loss, parts

    progress = run_training(model, lambda rng: None, tmp_path / "run", TrainSettings(steps=3, warmup=1, bf16=False),
                            step_loss=step_loss, metadata={})
    assert progress["step"] == 3 and progress["skipped"] == 1
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # the NaN step changed nothing
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the good step did
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "step 2: non-finite loss or gradient" in capsys.readouterr().err


def test_volumes_need_a_3d_network_and_record_an_isotropic_voxel_size_and_float32_by_default(tmp_path):
    with pytest.raises(ValueError, match="2D network"):
        train_volumes([blob_volume(0)], tmp_path / "run", "halfres-student", TrainSettings(steps=1))
    train_volumes([blob_volume(0)], tmp_path / "iso", UNetConfig(widths=(2, 4), ndim=3), TrainSettings(steps=1, batch_size=1),
                  crop=(4, 8, 8))
    meta = read_metadata(tmp_path / "iso" / "last.safetensors")
    assert meta["voxel_size"] == [1.0, 1.0, 1.0] and offsets_from_metadata(meta) == offsets_for(3)
    assert meta["training"]["bf16"] is False  # 3D steps run in float32 whatever was asked: the record says what ran


def test_cached_teacher_volume_crops_match_the_teacher_on_the_crop():
    torch.manual_seed(0)
    teacher = build_model(UNetConfig(widths=(4, 8), ndim=3, pool=((1, 2, 2),))).eval()
    volume = blob_volume(2, shape=(20, 40, 48))
    targets = compute_teacher_targets(teacher, [volume], with_features=True)
    batch = distill_batches([volume], targets, TrainSettings(batch_size=1, augment=NO_JITTER), crop=(14, 32, 32))(
        np.random.default_rng(3))  # this draw does not turn the crop (networks are not rotation-equivariant)
    with torch.no_grad():
        direct, _, _ = teacher.forward_padded(batch.images)
    inner = (slice(None), slice(None), slice(4, -4), slice(10, -10), slice(10, -10))  # away from the crop's borders
    torch.testing.assert_close(batch.teacher.embedding[inner], direct[inner], atol=2e-2, rtol=0)
    assert [tuple(f.shape[2:]) for f in batch.teacher.features] == [(14, 16, 16), (14, 32, 32)]


def test_a_grd_distillation_runs_on_volumes_with_the_teachers_offsets(tmp_path):
    torch.manual_seed(0)
    offsets = offsets_for(3, 2.0)
    teacher = save_checkpoint(tmp_path / "teacher.safetensors", build_model(UNetConfig(widths=(8, 16), ndim=3)),
                              {"name": "tiny 3D teacher", "offsets": [list(o) for o in offsets], "voxel_size": [2.0, 1.0, 1.0]})
    settings = TrainSettings(steps=4, batch_size=2, warmup=1, save_every=4, snapshot_every=1000, augment=NO_JITTER)
    distill = DistillSettings(method="grd", weights=method_weights("grd"), memory_size=4, memory_samples=2)
    seen = []
    volumes = [blob_volume(seed) for seed in range(3, 7)]  # the memory bank never serves a batch its own volume
    progress = distill_volume_student(teacher, volumes, tmp_path / "run", "unet3d-student", settings, distill,
                                      crop=(8, 16, 16), on_progress=seen.append)
    assert progress["step"] == 4 and all(np.isfinite(r["loss"]) for r in seen)
    kd_parts = {k for record in seen for k in record if k.startswith("kd_")}
    assert {"kd_affinity", "kd_node", "kd_edge", "kd_inter_affinity", "kd_inter_edge"} <= kd_parts
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    assert offsets_from_metadata(meta) == offsets and meta["voxel_size"] == [2.0, 1.0, 1.0]
    assert meta["teacher"]["name"] == "tiny 3D teacher" and meta["config"]["ndim"] == 3
