"""Networks: shapes at any input size, parameter counts, the half-resolution student design, 2D and 3D."""
import pytest
import torch

from napari_graphkd.affinity import offsets_for
from napari_graphkd.io.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from napari_graphkd.models import EMBEDDING_DIM, NAMED_CONFIGS, EmbeddingUNet, UNetConfig, build_model, count_parameters

NAMES_2D = [n for n, c in NAMED_CONFIGS.items() if c.ndim == 2]


def meta_parameters(config: UNetConfig) -> int:
    """Parameter count without allocating weights (meta device)."""
    with torch.device("meta"):
        return count_parameters(EmbeddingUNet(config))


@pytest.mark.parametrize("name", [n for n in NAMES_2D if n != "resunet-paper-teacher"])
@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_outputs_have_the_input_size_and_the_embedding_channels(name, size):
    model = build_model(name).eval()
    x = torch.rand(1, model.config.in_channels, *size)
    with torch.no_grad():
        emb, fg = model(x)
    assert emb.shape == (1, EMBEDDING_DIM, *size)
    assert fg is None or fg.shape == (1, 1, *size)


def test_paper_teacher_widths_are_available():
    cfg = NAMED_CONFIGS["resunet-paper-teacher"]
    assert cfg.widths == (32, 64, 179, 349, 680) and cfg.in_channels == 3


def test_half_resolution_student_runs_no_full_resolution_block():
    model = build_model("halfres-student").eval()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.rand(1, 1, 64, 64))
    for h in hooks:
        h.remove()
    assert max(seen) == 32  # every convolution runs at half resolution or below


def test_students_have_at_most_one_percent_of_the_teacher_parameters():
    teacher = count_parameters(build_model("resunet-cpu-teacher"))
    for name in ("halfres-student", "mobile-student"):
        assert count_parameters(build_model(name)) <= 0.01 * teacher, name


@pytest.mark.parametrize("name", ["unet3d-teacher", "unet3d-student"])
def test_volume_networks_keep_the_input_size(name):
    model = build_model(name).eval()
    x = torch.rand(1, 1, 9, 20, 27)
    with torch.no_grad():
        emb, fg = model(x)
    assert emb.shape == (1, EMBEDDING_DIM, 9, 20, 27) and fg.shape == (1, 1, 9, 20, 27)
    assert all(isinstance(m, torch.nn.Conv3d) for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))


def test_anisotropic_pooling_keeps_z_until_the_last_level():
    model = build_model(UNetConfig(widths=(2, 4, 4, 4), ndim=3, pool=((1, 2, 2), (1, 2, 2), (2, 2, 2)))).eval()
    assert model.size_multiples == (2, 8, 8)
    with torch.no_grad():
        emb, _, feats = model.forward_padded(torch.rand(1, 1, 4, 16, 16))
    assert [tuple(f.shape[2:]) for f in feats] == [(2, 2, 2), (4, 4, 4), (4, 8, 8), (4, 16, 16)]
    assert emb.shape[2:] == (4, 16, 16)


def test_a_coarse_z_stem_strides_only_in_y_and_x():
    config = UNetConfig(widths=(2, 4), ndim=3, stem_stride=2, pool=((1, 2, 2),))
    assert config.stem_strides() == (1, 2, 2) and EmbeddingUNet(config).size_multiples == (1, 4, 4)


def test_volume_parameter_counts_and_the_one_percent_student():
    teacher, student = (count_parameters(build_model(n)) for n in ("unet3d-teacher", "unet3d-student"))
    assert (teacher, student) == (2_188_513, 13_845)
    assert student <= 0.01 * teacher
    mala = NAMED_CONFIGS["mala3d"]
    assert mala.widths == (12, 60, 300, 1500) and mala.pool == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
    assert meta_parameters(mala) == 121_517_177


def test_a_2d_network_refuses_a_volume_in_one_line():
    with pytest.raises(ValueError, match="2D network"):
        build_model("halfres-student")(torch.rand(1, 1, 4, 16, 16))


def test_bad_pooling_is_refused():
    with pytest.raises(ValueError, match="pool"):
        UNetConfig(widths=(4, 8), ndim=3, pool=((2, 2),))


def test_2d_configs_serialise_as_before_and_3d_round_trips(tmp_path):
    assert set(UNetConfig().to_dict()) == {"widths", "in_channels", "embedding_dim", "stem_stride", "block", "foreground_head"}
    config = NAMED_CONFIGS["mala3d"]
    assert UNetConfig.from_dict(config.to_dict()) == config
    model = build_model(UNetConfig(widths=(2, 4), ndim=3, pool=((1, 2, 2),)))
    path = save_checkpoint(tmp_path / "v.safetensors", model)
    loaded, meta = load_checkpoint(path)
    assert loaded.config == model.config and meta["config"]["pool"] == [[1, 2, 2]]
    assert read_metadata(path)["config"]["ndim"] == 3 and meta["offsets"] == [list(o) for o in offsets_for(3)]
    anisotropic = save_checkpoint(tmp_path / "a.safetensors", model, {"offsets": [list(o) for o in offsets_for(3, 4.0)],
                                                                      "voxel_size": [40.0, 10.0, 10.0]})
    stored = read_metadata(anisotropic)
    assert stored["offsets"] == [list(o) for o in offsets_for(3, 4.0)] and stored["voxel_size"] == [40.0, 10.0, 10.0]
    for bad in ({"offsets": [[-1, 0]]}, {"voxel_size": [1.0, 1.0]}):
        save_checkpoint(tmp_path / "bad.safetensors", model, bad, overwrite=True)
        with pytest.raises(CheckpointError):
            read_metadata(tmp_path / "bad.safetensors")
