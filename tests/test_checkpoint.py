"""Checkpoint safety: round trip, atomic no-overwrite saves, clear errors, never unpickling."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from napari_graphkd import __version__
from napari_graphkd.affinity import OFFSETS
from napari_graphkd.io.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from napari_graphkd.models import EMBEDDING_DIM, UNetConfig, build_model
from napari_graphkd.preprocess import MIN_CONTRAST_SNR, PERCENTILES


def test_round_trip_keeps_weights_config_and_metadata(tmp_path):
    model = build_model(UNetConfig(widths=(4, 8, 8), stem_stride=2))
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"training_data": {"folder": "x"}})
    loaded, meta = load_checkpoint(path)
    assert loaded.config == model.config
    assert meta["training_data"] == {"folder": "x"}
    # the metadata records the constants the network was trained with, so a later change of them is detectable
    assert meta["offsets"] == [list(o) for o in OFFSETS] and meta["embedding_dim"] == EMBEDDING_DIM
    assert meta["input"]["percentiles"] == list(PERCENTILES) and meta["input"]["min_contrast_snr"] == MIN_CONTRAST_SNR
    assert meta["package_version"] == __version__
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_half_precision_export_is_smaller_and_loads_as_float32(tmp_path):
    model = build_model(UNetConfig(widths=(8, 16, 16)))
    full = save_checkpoint(tmp_path / "full.safetensors", model)
    half = save_checkpoint(tmp_path / "half.safetensors", model, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_saving_never_overwrites_unless_asked(tmp_path):
    model = build_model(UNetConfig(widths=(4, 8)))
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"tag": "first"})
    with pytest.raises(FileExistsError):
        save_checkpoint(path, model, {"tag": "second"})
    assert read_metadata(path)["tag"] == "first"
    save_checkpoint(path, model, {"tag": "second"}, overwrite=True)
    assert read_metadata(path)["tag"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left behind


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"\x00" * 5), "not a readable safetensors"),
        (lambda p: p.write_text("hello, I am a text file pretending to be weights"), "not a readable safetensors"),
        (lambda p: save_file({"w": torch.zeros(2)}, str(p)), "not a napari-graphkd checkpoint"),
        (lambda p: save_file({"w": torch.zeros(2)}, str(p), metadata={"graphkd": "{not json"}), "corrupt metadata"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_file_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(UNetConfig(widths=(4, 8))))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_weights_that_do_not_match_the_metadata_are_rejected(tmp_path):
    small = build_model(UNetConfig(widths=(4, 8)))
    path = save_checkpoint(tmp_path / "m.safetensors", small)
    meta = read_metadata(path)
    meta["config"]["widths"] = [4, 16]
    from safetensors.torch import load_file
    import json

    save_file(load_file(str(path)), str(tmp_path / "mismatch.safetensors"), metadata={"graphkd": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "mismatch.safetensors")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pickle_disguised_as_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(exploit))
    torch.save({"x": exploit}, tmp_path / "evil.pt")
    for candidate in (path, tmp_path / "evil.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(candidate)
    assert not marker.exists()
