"""Scoring networks on annotated samples and choosing decoder settings on a tune split."""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .data import Sample
from .decode.mws import DecodeSettings
from .decode.policy import decode_output
from .inference import NetworkOutput, network_output
from .metrics import evaluate, mean_metrics
from .models import EmbeddingUNet


def network_outputs(model: EmbeddingUNet, samples: list[Sample]) -> list[NetworkOutput]:
    """Network outputs of samples already at the model's scale (computed once, decoded many times)."""
    return [network_output(model, s.image) for s in samples]


def selection_score(per_image: list[dict[str, float]]) -> float:
    """F1@0.5 pooled over all objects of a split + mean AJI of its images that hold objects; chooses checkpoints and settings.

    Per-image means score an image without objects 1 or 0 (anything predicted), so on a 10-image
    tune split one such image moves the mean F1 by 0.1 and decided which checkpoint and decoder
    settings won. Pooled, its false objects count like any other false object.
    """
    found = sum(r["f1@0.5"] * (r["n_gt"] + r["n_pred"]) for r in per_image)  # 2 TP per image
    total = sum(r["n_gt"] + r["n_pred"] for r in per_image)
    with_objects = [r["aji"] for r in per_image if r["n_gt"] > 0] or [r["aji"] for r in per_image]
    return (found / total if total else 1.0) + float(np.mean(with_objects))


def per_image_metrics(outputs: list[NetworkOutput], samples: list[Sample], settings: DecodeSettings) -> list[dict[str, float]]:
    """Metrics of each sample's output decoded with ``settings`` against its labels."""
    return [evaluate(s.labels, decode_output(o, settings)[0]) for o, s in zip(outputs, samples)]


def score_outputs(outputs: list[NetworkOutput], samples: list[Sample], settings: DecodeSettings) -> dict[str, float]:
    """Per-image mean metrics of decoded outputs, plus the :func:`selection_score` as ``score``."""
    per_image = per_image_metrics(outputs, samples, settings)
    return dict(mean_metrics(per_image), score=selection_score(per_image))


def score_by_source(sizes: Sequence[int] | Mapping[str, int]) -> Callable[[list[NetworkOutput], list[Sample], DecodeSettings], dict[str, float]]:
    """A :func:`tune_decoder` score (also a validation score) for samples concatenated source by source (``sizes`` each).

    Per-image means over all images, and ``score`` = the mean of the sources' selection scores, so every source counts
    the same however many images it has. Named sizes (``{NAME: size}``) add each source's ``NAME/f1@0.5``,
    ``NAME/aji`` and ``NAME/score``; sources of size 0 are left out.
    """
    named = isinstance(sizes, Mapping)
    names = list(sizes) if named else [""] * len(sizes)
    bounds = np.cumsum([0, *(sizes.values() if named else sizes)])

    def score(outputs: list[NetworkOutput], samples: list[Sample], settings: DecodeSettings) -> dict[str, float]:
        per_image = per_image_metrics(outputs, samples, settings)
        groups = [(name, per_image[a:b]) for name, a, b in zip(names, bounds[:-1], bounds[1:]) if b > a]
        scores = mean_metrics(per_image)
        for name, rows in groups if named else ():
            means = mean_metrics(rows)
            scores.update({f"{name}/f1@0.5": means["f1@0.5"], f"{name}/aji": means["aji"], f"{name}/score": selection_score(rows)})
        scores["score"] = float(np.mean([selection_score(rows) for _, rows in groups]))
        return scores
    return score


def score_model(model: EmbeddingUNet, samples: list[Sample], settings: DecodeSettings = DecodeSettings()) -> dict[str, float]:
    """Per-image mean metrics of a model on annotated samples."""
    was_training = model.training
    model.eval()
    scores = score_outputs(network_outputs(model, samples), samples, settings)
    model.train(was_training)
    return scores


DECODE_GRID = {
    "resolution": ("full", "half"),
    "attractive_bias": (0.0, 0.15, 0.3, 0.5),
    "min_size": (40, 80, 160),
    "foreground_threshold": (0.4, 0.5, 0.6),
}


def tune_decoder(
    outputs: list[NetworkOutput],
    samples: list[Sample],
    base: DecodeSettings = DecodeSettings(),
    grid: dict[str, Iterable] = DECODE_GRID,
    objective: Callable[[dict[str, float]], float] = lambda m: m["score"],
    score: Callable[[list[NetworkOutput], list[Sample], DecodeSettings], dict[str, float]] = score_outputs,
) -> tuple[DecodeSettings, dict[str, float], list[tuple[dict, dict]]]:
    """Grid search of decoder settings on tune samples; returns best settings, its scores, all trials.

    ``score`` measures one setting on all samples (default: fully annotated samples, :func:`score_outputs`).
    """
    keys = list(grid)
    trials = []
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = replace(base, **dict(zip(keys, values)))
        trials.append((settings.to_dict(), score(outputs, samples, settings)))
    best = max(trials, key=lambda t: objective(t[1]))
    return DecodeSettings(**best[0]), best[1], trials
