"""Guidance for users: what a model was trained on, and whether a result looks out of its range.

:func:`assess` turns one segmentation result into concrete suggestions (tick "dark nuclei", set
the diameter, fine-tune) when the image looks unlike the model's training data; the napari
widget shows them as a notification and the CLI can print them. No napari or Qt here.
"""
from __future__ import annotations

from pathlib import PurePath
from typing import Any

import numpy as np

from .inference import TRAIN_DIAMETER
from .preprocess import grayscale
from .sizing import equivalent_diameters

BRIGHT_BACKGROUND = 0.35  # median this far up the 1-99.8 % intensity range: the background is bright
DARK_BACKGROUND = 0.1  # median below this: the background is dark (fluorescence)
UNSURE_BAND = (0.3, 0.7)  # foreground probabilities the model is unsure about
MAX_UNSURE = 0.1  # more of the image than this in UNSURE_BAND: the model does not recognise it
SIZE_RATIO = (0.6, 1.5)  # found nuclei this much smaller / larger than the diameter the model worked at
FRAGMENT_FRACTION = 0.4  # objects narrower than this fraction of the diameter are fragments
MAX_FRAGMENTS = 0.3  # more of the objects than this are fragments: the result is broken up
MIN_OBJECTS = 5  # fewer objects than this: sizes and fragment counts say little
SAMPLE_PIXELS = 1_000_000  # background level measured on at most this many pixels

KNOWN_DATASETS = {"bbbc039": "BBBC039 fluorescence (bright nuclei, dark background)",
                  "dsb2018_fluo": "DSB2018 fluorescence (several labs and magnifications)",
                  "dsb2018_brightfield": "DSB2018 bright-field (dark nuclei, bright background)",
                  "bbbc038": "BBBC038 / Data Science Bowl 2018 (mixed modalities)"}


def data_name(folder: str) -> str | None:
    """A known data set's description for a training folder or source name, else its last two path parts."""
    folder = folder.lower()
    name = next((text for key, text in KNOWN_DATASETS.items() if key in folder), None)
    return name if name is not None or not folder else "/".join(PurePath(folder).parts[-2:])  # never a whole machine path


def training_summary(description: dict[str, Any]) -> str:
    """One line on what a model was trained on: data set, image type, number of images, nucleus diameter, fine-tuning."""
    data = description.get("training_data") or {}
    diameter = float(description.get("train_diameter", TRAIN_DIAMETER))
    finetune = description.get("finetune") or {}
    text = ""
    if data or not finetune:
        sources = data.get("sources") or []
        if len(sources) > 1:
            name = " + ".join(data_name(str(s.get("folder") or s.get("name") or "")) or "unknown data" for s in sources)
        else:
            name = data_name(str(data.get("folder") or ""))
        parts = [name or "unknown data"] + ([f"{data['train_images']} images"] if data.get("train_images") else [])
        text = "trained on " + ", ".join(parts) + f", nuclei {diameter:.0f} px"
    if finetune:
        base = (finetune.get("base") or {}).get("name") or "a model"
        images = finetune.get("images") or []
        tuned = (f"{finetune.get('mode', 'fine-tuned')} of {base} on {len(images)} image(s) of yours "
                 f"(nuclei {float(finetune.get('diameter') or diameter):.0f} px, run at {diameter:.0f} px)")  # 3D: None = as trained
        text = f"{text}; then {tuned}" if text else tuned
    return text


def background_level(image: np.ndarray) -> float:
    """Where the median pixel lies between the 1st and 99.8th percentiles (0 = dark background, 1 = bright)."""
    gray = grayscale(np.asarray(image))
    step = max(1, int(np.sqrt(gray.size / SAMPLE_PIXELS)))
    values = gray[::step, ::step].astype(np.float32, copy=False)
    low, mid, high = np.percentile(values, (1.0, 50.0, 99.8))
    return float((mid - low) / (high - low)) if high > low else 0.0


def unsure_fraction(foreground: np.ndarray) -> float:
    """Fraction of pixels whose foreground probability is neither clearly nucleus nor background."""
    low, high = UNSURE_BAND
    return float(np.mean((foreground > low) & (foreground < high)))


def assess(result: Any, description: dict[str, Any], image: np.ndarray | None = None) -> list[str]:
    """Concrete suggestions when a result looks out of the model's range (empty when it looks fine).

    ``result`` is a :class:`~napari_graphkd.segment.SegmentResult`; ``description`` the model's
    ``describe()``; ``image`` the 2D image (or one plane of a stack) it segmented, for the modality check.
    """
    if description.get("architecture") == "otsu+watershed" or getattr(result, "volume", False):
        return []  # the rules below are about 2D nucleus images
    inputs = result.inputs
    invert = bool(getattr(inputs, "invert", False))
    train_diameter = float(description.get("train_diameter", TRAIN_DIAMETER))
    worked_at = getattr(inputs, "diameter", None) or train_diameter
    advice = []
    if image is not None and np.ndim(image) >= 2:
        level = background_level(image)
        if not invert and level > BRIGHT_BACKGROUND:
            advice.append("the image looks like dark nuclei on a bright background (e.g. bright-field), unlike the "
                          "model's training images: set the nuclei to 'dark on bright' (--invert yes), or fine-tune on a few "
                          "painted nuclei")
        elif invert and level < DARK_BACKGROUND:
            advice.append("the image has a dark background, yet it was inverted for the model: set the nuclei to "
                          "'bright on dark' (--invert no)")
    output = getattr(result, "output", None)
    if output is not None and output.foreground is not None:
        unsure = unsure_fraction(output.foreground)
        if unsure > MAX_UNSURE:
            advice.append(f"the model is unsure whether {unsure:.0%} of the image is nucleus or background (under 5 % on "
                          "images like its training data): fine-tune on a few painted nuclei of this kind of image")
    diameters = equivalent_diameters(np.asarray(result.labels).astype(np.int64, copy=False), skip_border=False)[0]
    if len(diameters) >= MIN_OBJECTS:
        typical = float(np.median(diameters))
        ratio = typical / worked_at
        if not SIZE_RATIO[0] <= ratio <= SIZE_RATIO[1]:
            advice.append(f"the nuclei found are about {typical:.0f} px across, but the model looked for {worked_at:.0f} px: "
                          f"set the nucleus diameter to {typical:.0f}")
        fragments = float(np.mean(diameters < FRAGMENT_FRACTION * worked_at))
        if fragments > MAX_FRAGMENTS:
            advice.append(f"{fragments:.0%} of the objects are tiny fragments (under {FRAGMENT_FRACTION * worked_at:.0f} px "
                          "across): check the diameter and the nuclei polarity, or fine-tune")
    return advice
