"""Classical nucleus segmentation baseline: what a CellProfiler user runs today.

Pipeline (on an image the input rules have prepared: grayscale, inverted for dark nuclei,
normalised): Gaussian blur (``sigma``) -> Otsu
threshold -> fill holes -> drop components smaller than ``min_size`` pixels ->
Euclidean distance transform -> one marker per distance peak at least
``min_distance`` pixels apart within each connected component -> watershed of
the negated distance inside the mask -> sequential relabelling.

Parameters: ``sigma`` (pixels) smooths noise before thresholding; ``min_distance``
(pixels) is roughly a nucleus radius and trades splits (too small) against
merges (too large); ``min_size`` (pixels) removes debris. All three are in pixels at the
training diameter of the networks and scale with the nucleus diameter of an image.

With the default settings on the 50 BBBC039 validation images it
measured F1@0.5 = 0.868, AJI = 0.787, PQ = 0.774 (per-image means of
`napari_graphkd.metrics.evaluate`) at about 52 ms/image on 2 CPU cores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import relabel_sequential, watershed



@dataclass(frozen=True)
class ClassicalSettings:
    """Smoothing (px), peak distance (px, about a nucleus radius) and smallest object (px)."""

    sigma: float = 1.0
    min_distance: int = 9
    min_size: int = 30

    def scaled(self, factor: float) -> "ClassicalSettings":
        """Settings for nuclei ``factor`` times the size these were chosen for."""
        return ClassicalSettings(self.sigma, max(1, int(round(self.min_distance * factor))),
                                 max(1, int(round(self.min_size * factor**2))))

    def to_dict(self) -> dict:
        """JSON-friendly dict (model descriptions, layer provenance)."""
        return asdict(self)


def foreground_mask(smoothed: np.ndarray, min_size: int) -> np.ndarray:
    """Otsu foreground with holes filled and components under min_size pixels removed."""
    if smoothed.min() == smoothed.max():
        return np.zeros(smoothed.shape, dtype=bool)
    mask = ndi.binary_fill_holes(smoothed > threshold_otsu(smoothed))
    components, _ = ndi.label(mask)
    sizes = np.bincount(components.ravel())
    return mask & (sizes >= min_size)[components]


def split_touching(mask: np.ndarray, min_distance: int) -> np.ndarray:
    """Split a binary mask into objects by watershed on its distance transform."""
    components, _ = ndi.label(mask)
    distance = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask)


def segment_classical(image: np.ndarray, settings: ClassicalSettings = ClassicalSettings()) -> np.ndarray:
    """Int32 instance labels of bright nuclei in a prepared (normalised) 2D image; 0 = background."""
    if image.ndim != 2:
        raise ValueError(f"segment_classical expects a 2D image, got shape {image.shape}")
    smoothed = ndi.gaussian_filter(image, settings.sigma)
    mask = foreground_mask(smoothed, settings.min_size)
    if not mask.any():
        return np.zeros(image.shape, dtype=np.int32)
    labels = split_touching(mask, settings.min_distance)
    return relabel_sequential(labels)[0].astype(np.int32)
