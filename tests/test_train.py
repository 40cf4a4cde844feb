"""Training: the loss falls on real crops, runs resume exactly, checkpoints carry provenance."""
import json

import numpy as np
import pytest

from napari_graphkd.data import AugmentConfig
from napari_graphkd.io.checkpoint import read_metadata
from napari_graphkd.train.loop import TrainSettings
from napari_graphkd.train.segmentation import train_segmentation


@pytest.fixture()
def folder(crop_folder):
    return crop_folder(200, 300)


def settings(steps):
    return TrainSettings(steps=steps, batch_size=2, lr=3e-3, warmup=5, save_every=10, snapshot_every=10,
                         validate_every=10, augment=AugmentConfig(crop=96))


def test_training_lowers_the_loss_and_resumes(folder, tmp_path):
    run = tmp_path / "run"
    first = train_segmentation(folder, run, "halfres-student", settings(20), n_tune=1)
    losses = [h["loss"] for h in first["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    resumed = train_segmentation(folder, run, "halfres-student", settings(30), n_tune=1)
    assert resumed["step"] == 30 and [h["step"] for h in resumed["history"]] == list(range(1, 31))
    meta = read_metadata(run / "last.safetensors")
    assert meta["step"] == 30 and meta["training"]["batch_size"] == 2
    assert len(meta["training_data"]["tune_images"]) == 1
    assert json.loads((run / "progress.json").read_text())["step"] == 30


def test_validation_keeps_the_best_checkpoint(folder, tmp_path):
    calls = []

    def factory(tune):
        def validate(model):
            calls.append(sum(map(len, tune.values())))  # tune images of every source
            return {"score": [0.5, 0.7, 0.6][len(calls) - 1]}
        return validate

    progress = train_segmentation(folder, tmp_path / "r", "halfres-student", settings(30), n_tune=1, validate_factory=factory)
    assert calls == [1, 1, 1]
    assert progress["best"]["step"] == 20
    assert read_metadata(tmp_path / "r" / "best.safetensors")["step"] == 20
