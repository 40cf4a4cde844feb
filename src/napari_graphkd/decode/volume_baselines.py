"""Volume baselines a user would otherwise run: 3D Otsu + distance-transform watershed for nuclei, a seeded
watershed on boundaries for EM neurites, and linking per-plane 2D labels across z by overlap.

Nuclei are blobs: one seed per distance peak at least ``min_distance`` apart, as the 2D classical
pipeline does. Neurites are tubes: their seeds are connected h-maxima of the distance ridges.

Lengths (``sigma``, ``min_distance``) are in in-plane pixels; ``voxel_size`` (z, y, x, in any unit
shared by the three axes) turns them into voxels per axis, so an anisotropic stack (coarse z) is
smoothed, measured and searched for seeds in physical space.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from skimage.feature import peak_local_max
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

from .classical import foreground_mask

VoxelSize = Sequence[float]


def _per_axis(length: float, voxel_size: VoxelSize) -> np.ndarray:
    """``length`` (in-plane pixels) in voxels along each axis: anisotropic smoothing and search radii."""
    voxel = np.asarray(voxel_size, dtype=float)
    return length * voxel[-1] / voxel


def box_footprint(radius: float, voxel_size: VoxelSize) -> np.ndarray:
    """All-true box reaching ``radius`` in-plane pixels along each axis (at least 1 voxel); box filters are separable, so fast."""
    radii = np.maximum(np.round(_per_axis(radius, voxel_size)), 1).astype(int)
    return np.ones(tuple(2 * radii + 1), dtype=bool)


def distance_seeds(distance: np.ndarray, mask: np.ndarray, voxel_size: VoxelSize, min_distance: float) -> np.ndarray:
    """Int32 markers, one per peak of ``distance`` inside each component of ``mask``, at least ``min_distance`` px apart."""
    footprint = box_footprint(min_distance, voxel_size)
    components, _ = ndi.label(mask)
    peaks = peak_local_max(distance, footprint=footprint, min_distance=max(1, int(min(footprint.shape) // 2)),
                           labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    peaks = peaks.reshape(-1, mask.ndim)  # peak_local_max returns (0, 2) when a volume has no peak
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return markers


@dataclass(frozen=True)
class NucleiSettings:
    """3D Otsu + watershed: smoothing (px), seed distance (px, about a nucleus radius), smallest object (voxels)."""

    sigma: float = 1.0
    min_distance: float = 9.0
    min_size: int = 200

    def to_dict(self) -> dict:
        """JSON-friendly dict (benchmark tables)."""
        return asdict(self)


def otsu_watershed_3d(image: np.ndarray, voxel_size: VoxelSize = (1.0, 1.0, 1.0),
                      settings: NucleiSettings = NucleiSettings()) -> np.ndarray:
    """Int32 nuclei labels of a bright-nuclei (Z,Y,X) volume: Gaussian, Otsu, fill holes, distance watershed."""
    if image.ndim != 3 or len(voxel_size) != 3:
        raise ValueError(f"otsu_watershed_3d expects a (Z,Y,X) volume and a 3-value voxel size, got {image.shape}")
    smoothed = ndi.gaussian_filter(image.astype(np.float32), _per_axis(settings.sigma, voxel_size))
    mask = foreground_mask(smoothed, settings.min_size)
    if not mask.any():
        return np.zeros(image.shape, dtype=np.int32)
    distance = ndi.distance_transform_edt(mask, sampling=voxel_size)
    markers = distance_seeds(distance, mask, voxel_size, settings.min_distance)
    return relabel_sequential(watershed(-distance, markers, mask=mask))[0].astype(np.int32)


def dark_membrane_boundaries(raw: np.ndarray, voxel_size: VoxelSize = (1.0, 1.0, 1.0), sigma: float = 1.0) -> np.ndarray:
    """Float32 boundary map in [0, 1] of an EM volume whose membranes are dark: the smoothed, inverted intensity."""
    smoothed = ndi.gaussian_filter(raw.astype(np.float32), _per_axis(sigma, voxel_size))
    lo, hi = np.percentile(smoothed, (1.0, 99.0))
    return np.clip((hi - smoothed) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class SeededSettings:
    """Seeded watershed: interior threshold on the boundary map, distance smoothing and seed depth h (px), smallest
    segment (voxels)."""

    threshold: float = 0.6
    seed_smooth: float = 1.0
    h: float = 2.0
    min_size: int = 100

    def to_dict(self) -> dict:
        """JSON-friendly dict (benchmark tables)."""
        return asdict(self)


def merge_small_segments(boundaries: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with segments under ``min_size`` voxels absorbed by their neighbours (watershed on the boundaries)."""
    sizes = np.bincount(labels.ravel())
    small = sizes[labels] < min_size
    if not small.any() or small.all():
        return labels
    return watershed(boundaries, np.where(small, 0, labels))


def ridge_seeds(interior: np.ndarray, voxel_size: VoxelSize, h: float, smooth: float) -> np.ndarray:
    """Int32 markers: connected h-maxima of the interior's smoothed (physical) distance transform.

    A neurite is a tube, so its distance transform is a ridge along the tube with many point maxima; the
    h-maxima of one ridge (no dip deeper than ``h`` px between them) join into one seed.
    """
    distance = ndi.distance_transform_edt(interior, sampling=voxel_size)
    if smooth > 0:
        distance = ndi.gaussian_filter(distance, _per_axis(smooth, voxel_size))
    maxima = h_maxima(distance, h) > 0
    return ndi.label(maxima & interior, structure=np.ones((3,) * interior.ndim))[0].astype(np.int32)


def seeded_watershed(boundaries: np.ndarray, voxel_size: VoxelSize = (1.0, 1.0, 1.0),
                     settings: SeededSettings = SeededSettings()) -> np.ndarray:
    """Int32 segments covering the whole volume: seeds on the distance ridges of the interior (boundaries below
    ``threshold``, :func:`ridge_seeds`), flooded over the boundary map; segments under ``min_size`` voxels merged
    into neighbours."""
    if boundaries.ndim != len(voxel_size):
        raise ValueError(f"boundaries of shape {boundaries.shape} need a voxel size of {boundaries.ndim} values")
    markers = ridge_seeds(boundaries < settings.threshold, voxel_size, settings.h, settings.seed_smooth)
    if markers.max() == 0:
        return np.ones(boundaries.shape, dtype=np.int32)
    labels = watershed(boundaries, markers)
    labels = merge_small_segments(boundaries, labels, settings.min_size)
    return relabel_sequential(labels)[0].astype(np.int32)


def _plane_links(previous: np.ndarray, current: np.ndarray, min_iou: float) -> dict[int, int]:
    """{current id: previous id} for one-to-one pairs of overlapping objects with IoU >= min_iou (max total IoU)."""
    both = (previous > 0) & (current > 0)
    if not both.any():
        return {}
    prev_ids, prev_areas = np.unique(previous[previous > 0], return_counts=True)
    cur_ids, cur_areas = np.unique(current[current > 0], return_counts=True)
    pairs, inter = np.unique(np.stack([previous[both], current[both]]), axis=1, return_counts=True)
    rows, cols = np.searchsorted(prev_ids, pairs[0]), np.searchsorted(cur_ids, pairs[1])
    iou = np.zeros((len(prev_ids), len(cur_ids)))
    iou[rows, cols] = inter / (prev_areas[rows] + cur_areas[cols] - inter)
    r, c = linear_sum_assignment(-iou)
    keep = iou[r, c] >= min_iou
    return {int(cur_ids[j]): int(prev_ids[i]) for i, j in zip(r[keep], c[keep])}


def link_planes(labels_zyx: np.ndarray, min_iou: float = 0.3, min_size: int = 0) -> np.ndarray:
    """Int32 volume labels from per-plane 2D labels: an object continues into the next plane's object that overlaps
    it with IoU >= ``min_iou`` (one-to-one, maximum total IoU); every other plane object starts a new id. Linked
    objects under ``min_size`` voxels (the caps and slivers a 2D model finds at a nucleus' top and bottom) are dropped."""
    if labels_zyx.ndim != 3:
        raise ValueError(f"link_planes expects (Z,Y,X) per-plane labels, got shape {labels_zyx.shape}")
    if not 0.0 < min_iou <= 1.0:
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
    out = np.zeros(labels_zyx.shape, dtype=np.int32)
    next_id = 1
    for z, plane in enumerate(labels_zyx):
        ids, inverse = np.unique(plane, return_inverse=True)
        links = _plane_links(out[z - 1], plane, min_iou) if z else {}
        new = np.zeros(len(ids), dtype=np.int32)
        for k, local in enumerate(ids):
            if local == 0:
                continue
            if int(local) in links:
                new[k] = links[int(local)]
            else:
                new[k], next_id = next_id, next_id + 1
        out[z] = new[inverse.reshape(plane.shape)]
    if min_size > 0:
        out[np.bincount(out.ravel())[out] < min_size] = 0
        out = relabel_sequential(out)[0]
    return out


def fill_background(labels: np.ndarray, voxel_size: VoxelSize | None = None) -> np.ndarray:
    """Labels with every 0 voxel given its nearest segment's id: EM neuropil has no background, so a decoder's
    unassigned voxels (thin boundaries) belong to a neighbouring neurite. All-zero labels stay as they are."""
    if not labels.any():
        return labels
    nearest = ndi.distance_transform_edt(labels == 0, sampling=voxel_size, return_distances=False, return_indices=True)
    return labels[tuple(nearest)]
