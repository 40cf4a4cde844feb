"""Annotation rules of fine-tuning: what a partial annotation teaches, and which cells are held out.

* every painted id > 0 is one cell;
* checked background: unpainted pixels within ``margin`` px of a painted cell, and every
  unpainted pixel inside a checked region (e.g. the user's rectangles). In a volume the margin
  and the band below are distances in y-x pixels, measured with the voxel size (a z step of an
  anisotropic volume counts as its voxel's z size);
* every other pixel is not annotated (-1 in the training map): every loss ignores it, it is
  never taught as background. There, the teacher's decoded nuclei that lie wholly in
  unannotated pixels are pseudo-instances for the graph (IGD) terms;
* held-out cells: with one image, a fifth of the painted cells (at least one, fixed seed), plus
  a band of ``max(margin, 4)`` px around them, are left out of training; with several images, the
  last image is left out entirely. Before/after scores are measured on the held-out cells only;
* the decoder is re-tuned on painted cells against the *judged* predictions: those touching a
  painted cell, and those lying mostly on checked background (false positives there are known to
  be false). Predictions elsewhere cannot be judged and do not count.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ...metrics import aji, match_instances, overlaps

HELDOUT_FRACTION = 5  # one painted cell in five is held back


def annotation_map(labels: np.ndarray, checked: np.ndarray | None = None, margin: int = 8,
                   sampling: tuple[float, ...] | None = None) -> np.ndarray:
    """Training map of a partial annotation: painted ids, 0 for checked background, -1 elsewhere.

    ``sampling``: a volume's voxel size per axis in units of its x pixels (None: 1 on every axis).
    """
    painted = labels > 0
    background = (ndi.distance_transform_edt(~painted, sampling=sampling) <= margin if painted.any()
                  else np.zeros_like(painted))
    if checked is not None:
        background |= checked
    out = np.where(background, 0, -1).astype(np.int32)
    out[painted] = labels[painted]
    return out


def split_cells(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids) of the painted cells: a fifth (at least one) held out, by a fixed seed."""
    ids = np.unique(labels[labels > 0])
    held = np.random.default_rng(seed).permutation(ids)[: max(1, len(ids) // HELDOUT_FRACTION)]
    return np.setdiff1d(ids, held), np.sort(held)


def exclude_cells(train_map: np.ndarray, cells: np.ndarray, band: int, sampling: tuple[float, ...] | None = None) -> np.ndarray:
    """``train_map`` with ``cells`` (a mask) and a band of ``band`` px around them set to -1 (not annotated); ``sampling``
    as in :func:`annotation_map`."""
    near = ndi.distance_transform_edt(~cells, sampling=sampling) <= band if cells.any() else cells
    return np.where(near, -1, train_map).astype(np.int32)


def pseudo_instances(teacher_labels: np.ndarray, train_map: np.ndarray) -> np.ndarray:
    """The teacher's instances lying wholly in unannotated pixels (the others dropped)."""
    touched = np.unique(teacher_labels[train_map >= 0])
    return np.where(np.isin(teacher_labels, touched), 0, teacher_labels)


def heldout_metrics(cells: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Scores on held-out cells only, since nobody annotated the rest of the image.

    ``recall@0.5``: fraction of held-out cells matched (one to one) by a predicted instance with
    IoU >= 0.5; ``mean_iou``: mean over held-out cells of their best IoU with any prediction (0 if
    none overlaps); ``aji``: AJI of the held-out cells against the predicted instances overlapping
    them (predictions elsewhere cannot be judged, so they do not count).
    """
    ov = overlaps(cells, pred)
    if ov.n_gt == 0:
        raise ValueError("no held-out cell to score")
    best = ov.iou().max(axis=1) if ov.n_pred else np.zeros(ov.n_gt)
    near = np.setdiff1d(np.unique(pred[cells > 0]), [0])
    return {
        "recall@0.5": match_instances(cells, pred, 0.5).tp / ov.n_gt,
        "mean_iou": float(best.mean()),
        "aji": aji(cells, np.where(np.isin(pred, near), pred, 0)),
        "cells": float(ov.n_gt),
    }


def judged_predictions(annotation: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``pred`` keeping the instances touching a painted cell or lying mostly on checked background (``annotation`` == 0)."""
    ids = np.unique(pred[pred > 0])
    if ids.size == 0:
        return pred
    on_background = np.asarray(ndi.mean(annotation == 0, pred, ids)) > 0.5
    keep = np.union1d(np.unique(pred[annotation > 0]), ids[on_background])
    return np.where(np.isin(pred, keep), pred, 0)


def annotation_scores(annotation: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Painted cells (``annotation`` > 0) against the judged predictions: recall, precision and F1 at IoU 0.5, AJI."""
    cells = np.where(annotation > 0, annotation, 0)
    judged = judged_predictions(annotation, pred)
    match = match_instances(cells, judged, 0.5)
    n_cells, n_pred = len(np.unique(cells)) - 1, len(np.unique(judged[judged > 0]))
    if n_cells == 0:
        raise ValueError("no painted cell to score")
    return {"recall@0.5": match.tp / n_cells, "precision@0.5": match.tp / max(n_pred, 1),
            "f1@0.5": 2 * match.tp / (n_cells + n_pred), "aji": aji(cells, judged)}
