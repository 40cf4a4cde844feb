"""Doctored checkpoint metadata and weights are refused with one line naming the field, before anything is built."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_graphkd.io.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.segment import BUNDLED, bundled_path, load_segmenter


def doctored(tmp_path, edit, tensors=None):
    """A copy of a tiny checkpoint whose metadata went through ``edit`` (and optionally other tensors)."""
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(UNetConfig(widths=(4, 8))),
                           {"decode": {"resolution": "half", "min_size": 40}, "train_diameter": 28.0})
    meta = read_metadata(path)
    edit(meta)
    out = tmp_path / "doctored.safetensors"
    save_file(tensors or load_file(str(path)), str(out), metadata={"graphkd": json.dumps(meta)})
    return out


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m["decode"].update(eighth=True), "decode.eighth"),
        (lambda m: m["decode"].update(resolution="eighth"), "decode.resolution"),
        (lambda m: m["decode"].update(min_size="big"), "decode.min_size"),
        (lambda m: m["decode"].update(merge_distance=10**9), "decode.merge_distance"),
        (lambda m: m["decode"].update(foreground_threshold=float("nan")), "decode.foreground_threshold"),
        (lambda m: m.update(input="x"), "input"),
        (lambda m: m["input"].update(percentiles=[99, 1]), "input.percentiles[1]"),
        (lambda m: m["input"].update(invert="yes"), "input.invert"),
        (lambda m: m["config"].update(widths=[100000, 200000, 300000]), "config.widths[0]"),
        (lambda m: m["config"].update(widths=[1024] * 8), "config.widths"),
        (lambda m: m["config"].update(widths=[4] * 40), "config.widths"),
        (lambda m: m["config"].update(embedding_dim=10**7), "config.embedding_dim"),
        (lambda m: m["config"].update(block="transformer"), "config.block"),
        (lambda m: m["config"].update(stem_stride=8), "config.stem_stride"),
        (lambda m: m["config"].update(depth=3), "config.depth"),
        (lambda m: m.update(train_diameter=-5), "train_diameter"),
        (lambda m: m.update(offsets=[[-1, 0]]), "offsets"),
        (lambda m: m.update(format_version=99), "format_version"),
    ],
)
def test_doctored_metadata_is_refused_naming_the_field(tmp_path, edit, field):
    path = doctored(tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"'{field}'" in message and "\n" not in message


def test_absurd_widths_are_refused_before_any_allocation(tmp_path, monkeypatch):
    path = doctored(tmp_path, lambda m: m["config"].update(widths=[1000, 1000, 1000, 1000, 1000, 1000]))
    built = []
    monkeypatch.setattr("napari_graphkd.models.unet.EmbeddingUNet.__init__", lambda self, c: built.append(c))
    with pytest.raises(CheckpointError, match="parameters"):
        load_checkpoint(path)
    assert built == []


def test_non_finite_weights_are_refused(tmp_path):
    small = build_model(UNetConfig(widths=(4, 8)))
    tensors = {k: v.contiguous().clone() for k, v in small.state_dict().items()}
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    path = doctored(tmp_path, lambda m: None, tensors)
    with pytest.raises(CheckpointError, match=f"{name}.*NaN"):
        load_checkpoint(path)


def test_segmenters_of_doctored_checkpoints_never_get_built(tmp_path):
    path = doctored(tmp_path, lambda m: m["decode"].update(resolution="eighth"))
    with pytest.raises(CheckpointError, match="decode.resolution"):
        load_segmenter(str(path))


@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_checkpoints_pass_the_schema(name):
    model, meta = load_checkpoint(bundled_path(name))
    assert meta["decode"]["resolution"] in ("full", "half") and all(torch.isfinite(p).all() for p in model.parameters())
