"""The training commands of ``graphkd`` end to end (tiny steps, tiny crops of the bundled samples), their
argument parsing (``parse_weights``), the decoder search behind ``export --tune-data`` and ``graphkd demo``."""
import json

import numpy as np
import pytest
import torch

from napari_graphkd.cli import CLIError, main, parse_weights
from napari_graphkd.data import Sample
from napari_graphkd.decode.mws import DecodeSettings
from napari_graphkd.distill import DistillWeights
from napari_graphkd.evaluation import network_outputs, score_by_source, score_outputs, tune_decoder
from napari_graphkd.io.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.preprocess import normalize
from napari_graphkd.segment import BUNDLED, bundled_path

TINY_RUN = ["--steps", "2", "--crop", "64", "--batch-size", "1", "--n-tune", "1", "--validate-every", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def folder(crop_folder):
    """images/ and labels/ with four real 128 x 160 crops of a bundled sample."""
    return crop_folder(128, 160)


def test_train_writes_best_and_last_checkpoints_with_the_command(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--out", str(run), "--arch", "halfres-student", *TINY_RUN]) == 0
    assert "finished at step 2" in capsys.readouterr().out
    meta = read_metadata(run / "last.safetensors")
    assert meta["step"] == 2 and meta["command"].startswith("graphkd train")
    assert len(meta["training_data"]["tune_images"]) == 1 and meta["training_data"]["train_images"] == 3
    assert read_metadata(run / "best.safetensors")["validation"]


def test_distill_applies_weight_overrides_and_records_them(folder, tmp_path, capsys):
    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "teacher.safetensors", build_model(UNetConfig(widths=(4, 8, 8))), {"name": "t"})
    run = tmp_path / "student"
    args = ["distill", "--teacher", str(teacher), "--data", str(folder), "--out", str(run), "--method", "grd",
            "--weight", "inter_edge=0", "--memory-size", "2", "--memory-samples", "1", *TINY_RUN]
    assert main(args) == 0
    assert "finished at step 2" in capsys.readouterr().out
    meta = read_metadata(run / "last.safetensors")
    assert meta["distillation"]["method"] == "grd"
    assert meta["distillation"]["weights"]["inter_edge"] == 0 and meta["distillation"]["weights"]["affinity"] > 0


def test_export_tunes_the_decoder_and_writes_a_half_precision_copy(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--out", str(run), "--arch", "halfres-student", *TINY_RUN]) == 0
    out = tmp_path / "small.safetensors"
    args = ["export", str(run / "last.safetensors"), str(out), "--tune-data", str(folder), "--half",
            "--resolution", "half", "--name", "mine"]
    assert main(args) == 0
    assert "decoder tuned on 1 tune images" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["name"] == "mine" and meta["decode"]["resolution"] == "half" and "f1@0.5" in meta["tune_metrics"]
    model, _ = load_checkpoint(out)
    original, _ = load_checkpoint(run / "last.safetensors")
    for name, tensor in original.state_dict().items():  # fp16 round trip of every weight
        torch.testing.assert_close(model.state_dict()[name], tensor, atol=2e-3, rtol=1e-2)
    assert main(args) == 2  # never overwrites


def test_export_refuses_to_tune_without_tune_images_in_the_metadata(tiny_checkpoint, folder, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "o.safetensors"), "--tune-data", str(folder)]) == 2
    assert "lists no tune images" in capsys.readouterr().err


def test_demo_prints_one_row_per_model_with_good_scores(capsys):
    assert main(["demo", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    names = (*BUNDLED, "classical")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in names}
    assert set(rows) == set(names)
    f1 = {name: float(row[-4]) for name, row in rows.items()}
    assert min(f1[name] for name in BUNDLED) > 0.9 and f1["classical"] > 0.5


def test_parse_weights_reads_a_config_then_applies_overrides(tmp_path):
    config = tmp_path / "w.json"
    config.write_text(json.dumps({"weights": {"affinity": 5.0, "edge": 0.3}}))
    weights = parse_weights("grd", ["edge=0.7", "inter_edge=0"], str(config))
    assert isinstance(weights, DistillWeights)
    assert (weights.affinity, weights.edge, weights.inter_edge) == (5.0, 0.7, 0.0)  # the override wins over the file
    assert weights.node == DistillWeights().node  # untouched terms keep the method's value
    assert parse_weights("none", [], None).active() == {}


@pytest.mark.parametrize("overrides, config, message", [
    (["nonsense=1"], None, "unknown loss term(s) nonsense"),
    (["edge=abc"], None, "'abc' is not a number"),
    (["edge"], None, "expects NAME=VALUE"),
    ([], "missing.json", "cannot read config missing.json"),
])
def test_parse_weights_rejects_bad_input_with_one_message(overrides, config, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLIError) as err:
        parse_weights("grd", overrides, config)
    assert message in str(err.value)


def test_parse_weights_rejects_an_unknown_term_in_the_config(tmp_path):
    config = tmp_path / "w.json"
    config.write_text(json.dumps({"weights": {"afinity": 1.0}}))
    with pytest.raises(CLIError, match="unknown loss term\\(s\\) afinity; known: .*affinity"):
        parse_weights("grd", [], str(config))


def test_tune_decoder_returns_the_best_setting_of_its_grid(sample):
    """Every trial of the grid is scored; the returned settings and scores are those of the best trial."""
    image, labels = sample
    model, _ = load_checkpoint(bundled_path("student"))
    samples = [Sample("s", normalize(image[:192, :256]), labels[:192, :256])]
    outputs = network_outputs(model, samples)
    grid = {"foreground_threshold": (0.05, 0.4, 0.95), "min_size": (40,)}
    settings, scores, trials = tune_decoder(outputs, samples, grid=grid)
    assert [t[0]["foreground_threshold"] for t in trials] == [0.05, 0.4, 0.95]
    assert scores["score"] == max(t[1]["score"] for t in trials)
    assert scores == score_outputs(outputs, samples, settings)
    assert settings.foreground_threshold == 0.4 and settings.min_size == 40  # extreme thresholds merge or lose nuclei
    assert settings.attractive_bias == DecodeSettings().attractive_bias  # keys outside the grid keep the base value
    assert np.isfinite([t[1]["score"] for t in trials]).all()


def test_decoder_score_by_source_counts_every_source_the_same(folder):
    from napari_graphkd.data import load_folder

    torch.manual_seed(0)
    samples = load_folder(folder)
    outputs = network_outputs(build_model(UNetConfig(widths=(4, 8, 8))).eval(), samples)
    settings = DecodeSettings()
    pooled = score_by_source([1, 3])(outputs, samples, settings)
    first = score_outputs(outputs[:1], samples[:1], settings)["score"]
    rest = score_outputs(outputs[1:], samples[1:], settings)["score"]
    assert pooled["score"] == pytest.approx((first + rest) / 2)
    assert pooled["f1@0.5"] == pytest.approx(score_outputs(outputs, samples, settings)["f1@0.5"])


def test_named_score_by_source_adds_each_source_and_leaves_empty_ones_out(folder):
    from napari_graphkd.data import load_folder

    torch.manual_seed(0)
    samples = load_folder(folder)
    outputs = network_outputs(build_model(UNetConfig(widths=(4, 8, 8))).eval(), samples)
    settings = DecodeSettings()
    named = score_by_source({"one": 1, "none": 0, "rest": 3})(outputs, samples, settings)
    assert named["score"] == score_by_source([1, 3])(outputs, samples, settings)["score"]
    for name, part in (("one", slice(0, 1)), ("rest", slice(1, 4))):
        alone = score_outputs(outputs[part], samples[part], settings)
        assert [named[f"{name}/{k}"] for k in ("f1@0.5", "aji", "score")] == [alone[k] for k in ("f1@0.5", "aji", "score")]
    assert not any(key.startswith("none/") for key in named)
