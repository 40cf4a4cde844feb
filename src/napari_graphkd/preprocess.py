"""Input rules: channel conversion, robust normalisation, object-size rescaling."""
from __future__ import annotations

import numpy as np

PERCENTILES = (1.0, 99.8)
# Smallest percentile range, in units of the noise std, that is stretched to [0, 1]. Chosen on the
# BBBC039 train folder: its nucleus-free image spans 9.5 sigma, every image with nuclei >= 110 sigma.
MIN_CONTRAST_SNR = 30.0
# A pixel above the stretched range (> 1 after normalisation) and brighter than all 8 neighbours by more
# than this share of the range is a hot pixel (defective or saturated sensor element, cosmic ray): the
# optics blur every real structure over several pixels. Needs no statistics beyond the stretch, so
# chunk-by-chunk normalisation applies the same rule.
HOT_PIXEL_MARGIN = 0.2

MAX_WORKING_PIXELS = 2**28  # largest image (after object-size rescaling) a network is run on

class InputError(ValueError):
    """An image cannot be segmented as given (shape, values, size)."""


def check_finite(image: np.ndarray) -> None:
    """Raise InputError for NaN/inf values, which would silently poison every prediction."""
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise InputError("image contains NaN or infinite values")


def to_grayscale(image: np.ndarray, invert: bool = False) -> np.ndarray:
    """2D float32 image from a 2D grayscale, (H,W,3|4) RGB(A) or (H,W,C) multi-channel array.

    RGB uses ITU-R 601 luminance; other multi-channel images take the channel mean.
    ``invert`` flips intensities, for dark nuclei on a bright background (bright-field, H&E).
    """
    image = np.asarray(image)
    check_finite(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        gray = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif image.ndim == 3 and image.shape[-1] <= 8:
        gray = image.astype(np.float32).mean(-1)
    elif image.ndim == 2:
        gray = image.astype(np.float32)
    else:
        raise InputError(f"expected a 2D image (H,W) or (H,W,C) with C<=8, got shape {image.shape}")
    if invert:
        gray = gray.max() - gray
    return gray


def grayscale(image: np.ndarray, invert: bool = False) -> np.ndarray:
    """The 2D image to normalise: 8/16-bit grayscale as it is (exact histogram percentiles, no float copy), else :func:`to_grayscale`."""
    image = np.asarray(image)
    if image.ndim == 2 and not invert and image.dtype.kind == "u" and image.dtype.itemsize <= 2:
        return image  # normalize gives the same float32 values as for its float32 copy
    return to_grayscale(image, invert=invert)


def median(values: np.ndarray) -> np.floating:
    """``np.median`` of a 1D float array, same bits, from one single-k partition (SIMD select): ~5x faster."""
    half = values.size // 2
    part = np.partition(values, half)
    if np.isnan(part[half:].max()):
        return part.dtype.type(np.nan)
    return part[half] if values.size % 2 else (part[:half].max() + part[half]) / 2


def noise_sigma(image: np.ndarray) -> float:
    """Robust sensor-noise std: MAD of horizontal neighbour differences on every 4th row (~0.3 ms per 520x696).

    Nucleus edges are too few to move the median. ``skimage.restoration.estimate_sigma`` does the
    same job but needs PyWavelets, one more dependency for one number.
    """
    diffs = np.diff(np.asarray(image, dtype=np.float32)[::4], axis=1).ravel()
    if diffs.size == 0:
        return 0.0
    return float(1.4826 * median(np.abs(diffs - median(diffs))) / np.sqrt(2.0))


def percentile_range(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """``np.percentile(image, percentiles)``; 8/16-bit images read it off their histogram: same bits, ~4x faster."""
    small_ints = image.dtype.kind == "u" and image.dtype.itemsize <= 2 and image.size > 0
    if not (small_ints and 0 <= min(percentiles) <= max(percentiles) <= 100):
        return np.percentile(image, percentiles)
    return histogram_percentiles(np.bincount(image.ravel()), percentiles)


def histogram_percentiles(counts: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """``np.percentile`` of the non-negative integers whose histogram is ``counts`` (also for images read in chunks)."""
    size = int(counts.sum())
    position = (size - 1) * (np.asarray(percentiles, dtype=np.float64) / 100)
    below = np.floor(position).astype(np.intp)
    cumulative = np.cumsum(counts)
    a, b = np.searchsorted(cumulative, [below, np.minimum(below + 1, size - 1)], side="right")
    gamma = position - below
    return np.where(gamma >= 0.5, b - (b - a) * (1 - gamma), a + (b - a) * gamma)  # numpy's linear interpolation, op for op


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Indices one step outside [0, n) mirrored back inside (-1 -> 1, n -> n-2)."""
    return np.where(index < 0, -index, np.where(index >= n, 2 * (n - 1) - index, index))


def suppress_hot_pixels(image: np.ndarray, above: float, margin: float) -> int:
    """Clamp, in place, every pixel brighter than ``above`` and than all 8 neighbours by more than ``margin``
    to its neighbours' maximum; return how many were clamped.

    Only pixels above ``above`` (in a normalised image, those above the high percentile: ~0.2 %) are
    examined, so the cost is one comparison pass over the image.
    """
    h, w = image.shape
    if h < 2 or w < 2:
        return 0
    candidates = np.flatnonzero(image > above)
    if candidates.size == 0:
        return 0
    rows, cols = np.divmod(candidates, w)
    flat = image.reshape(-1)
    neighbours = np.full(candidates.size, -np.inf, dtype=np.float32)
    for dy in (-1, 0, 1):
        r = _reflect(rows + dy, h)
        for dx in (-1, 0, 1):
            if dy or dx:
                np.maximum(neighbours, flat[r * w + _reflect(cols + dx, w)], out=neighbours)
    hot = flat[candidates] > neighbours + margin
    flat[candidates[hot]] = neighbours[hot]
    return int(np.count_nonzero(hot))


def normalize(
    image: np.ndarray,
    percentiles: tuple[float, float] = PERCENTILES,
    min_contrast_snr: float = MIN_CONTRAST_SNR,
    hot_pixel_margin: float = HOT_PIXEL_MARGIN,
) -> np.ndarray:
    """Map the low/high percentiles to 0/1 (constant images map to 0), hot pixels removed.

    The stretch never exceeds ``(lo + min_contrast_snr * noise) -> 1``: an empty field's sensor noise
    is not amplified into nucleus-like texture (0 turns the floor off, e.g. for crop augmentation).
    Isolated pixels above 1 and brighter than all their neighbours by over ``hot_pixel_margin`` take
    their neighbours' maximum (:func:`suppress_hot_pixels`), so a defective or saturated sensor
    element never becomes a nucleus, however empty the field (0 turns it off).
    """
    lo, hi = percentile_range(image, percentiles)
    noise = noise_sigma(image) if min_contrast_snr > 0 else 0.0
    return stretch(image, *stretch_range(lo, hi, noise, min_contrast_snr), hot_pixel_margin=hot_pixel_margin)


def stretch_range(lo: float, hi: float, noise: float, min_contrast_snr: float = MIN_CONTRAST_SNR) -> tuple[float, float]:
    """(offset, scale) of :func:`normalize` from the image's percentiles and noise std."""
    scale = max(hi - lo, min_contrast_snr * noise if min_contrast_snr > 0 else 0.0)
    return lo, (scale if scale > 0 else 1.0)


def stretch(image: np.ndarray, lo: float, scale: float, hot_pixel_margin: float = HOT_PIXEL_MARGIN) -> np.ndarray:
    """``(image - lo) / scale`` as float32, hot pixels clamped (:func:`suppress_hot_pixels`): the normalisation,
    also applied chunk by chunk with whole-image statistics."""
    out = ((image.astype(np.float32) - lo) / scale).astype(np.float32)
    if hot_pixel_margin > 0 and out.ndim == 2:
        suppress_hot_pixels(out, 1.0, hot_pixel_margin)
    return out


AUTO = "auto"
CHANNEL_MODES = ("luminance", "hematoxylin")
# Polarity: nuclei are a minority at one end of the histogram with a wide spread of intensities, the
# background's end is narrow (flat, only noise). The wider of the two 5 % tails marks the objects.
# Measured log(dark tail / bright tail) widths: BBBC039 and DSB2018 fluorescence <= -1.09, DSB2018
# bright-field >= 1.99, its 256 px crops >= 1.59, an RGB IHC tile's luminance 1.25.
POLARITY_TAIL = 5.0
# Below this 0.5-99.5 percentile span, in noise stds, an image holds no objects to tell polarity by: nucleus-free
# BBBC039 fields span 7.9-9.8, a noisy DSB2018 fluorescence tile 6.7, a textured RGB IHC tile 27.
POLARITY_MIN_SNR = 15.0
# RGB counts as stained histology when its channels differ by this fraction of the intensity range.
MIN_STAIN_CHROMA = 0.05


def tail_asymmetry(gray: np.ndarray) -> float:
    """log(width of the darkest 5 % / width of the brightest 5 %), widths measured from the 0.5 and 99.5 percentiles; > 0: dark objects."""
    p0, p1, p2, p3 = percentile_range(gray, (0.5, POLARITY_TAIL, 100.0 - POLARITY_TAIL, 99.5))
    eps = 1e-3 * max(float(p3 - p0), 1e-12)  # a saturated, perfectly flat tail has width 0
    return float(np.log((p1 - p0 + eps) / (p3 - p2 + eps)))


def detect_polarity(image: np.ndarray) -> bool:
    """True when the image shows dark objects on a bright background (bright-field, H&E), i.e. it should be inverted.

    Objects are the end of the histogram with the wider tail (:func:`tail_asymmetry`), however many
    there are; an image whose contrast is within sensor noise (no objects, see ``MIN_CONTRAST_SNR``)
    is not inverted.
    """
    gray = grayscale(image)
    lo, hi = percentile_range(gray, (0.5, 99.5))
    if hi - lo <= POLARITY_MIN_SNR * noise_sigma(gray):
        return False
    return tail_asymmetry(gray) > 0.0


def hematoxylin(image: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (bright nuclei on a dark background) of an RGB(A) image, by colour deconvolution."""
    from skimage.color import rgb2hed

    image = np.asarray(image)
    if not (image.ndim == 3 and image.shape[-1] in (3, 4)):
        raise InputError(f"the hematoxylin input mode needs an RGB image (H,W,3), got shape {image.shape}")
    check_finite(image)
    return np.clip(rgb2hed(image[..., :3])[..., 0], 0, None).astype(np.float32)


def is_stained_rgb(image: np.ndarray) -> bool:
    """True for a coloured RGB image with dark objects on a bright background (H&E / IHC), where hematoxylin applies."""
    image = np.asarray(image)
    if not (image.ndim == 3 and image.shape[-1] in (3, 4)):
        return False
    rgb = image[::2, ::2, :3].astype(np.float32)
    span = float(rgb.max() - rgb.min())
    chroma = float(np.mean(rgb.max(-1) - rgb.min(-1))) / span if span > 0 else 0.0
    return chroma >= MIN_STAIN_CHROMA and detect_polarity(rgb)


def channel_image(image: np.ndarray, mode: str) -> np.ndarray:
    """The 2D image the network reads: ``luminance`` (gray/RGB/multi-channel rules of :func:`to_grayscale`) or ``hematoxylin``."""
    if mode == "hematoxylin":
        return hematoxylin(image)
    if mode == "luminance":
        return np.asarray(image) if np.asarray(image).ndim == 2 else to_grayscale(image)
    raise InputError(f"unknown input mode {mode!r}; choose {', '.join(CHANNEL_MODES)} or {AUTO}")

