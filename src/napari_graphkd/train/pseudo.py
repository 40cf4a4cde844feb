"""Images without labels for distillation: the teacher's own instances on them, decoded once and cached.

Each unlabelled image is treated as a user's image: the input rules of ``graphkd segment`` (channel,
polarity, nucleus diameter measured by the teacher itself) bring it to the model's scale, and the
teacher's network and decoder settings segment it there. The decoded instances then serve either as
pseudo-instances for the graph terms (the segmentation loss ignores those pixels, see
:func:`napari_graphkd.train.distill.with_pseudo_labels`) or, for the pseudo-label baseline, as the
segmentation loss's targets.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from ..data import Sample, find_part, read_split, read_tiff, split_list_path
from ..decode.policy import decode_output
from ..inference import network_output, rescale_factor, working_image
from ..io.checkpoint import atomic_save_tensors
from ..preprocess import channel_image
from ..segment import ModelSegmenter, decide_inputs

IMAGE_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class UnlabelledSource:
    """Images given without labels: a folder and, optionally, the stems to use; its sampling weight."""

    name: str
    folder: Path  # the folder holding the image files
    stems: tuple[str, ...] | None = None
    weight: float = 1.0


def parse_unlabelled(spec: str, weight: float = 1.0) -> UnlabelledSource:
    """Source from ``DIR`` (its ``images/`` folder, else its own .tif files) or ``DIR@SPLIT`` (the SPLIT_train images, labels unused)."""
    folder, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "")
    folder = Path(folder)
    if split:
        stems = tuple(read_split(split_list_path(split, "train")))
        return UnlabelledSource(f"{Path(split).name}-unlabelled", find_part(folder, "train", list(stems)) / "images",
                                stems, weight)
    images = folder / "images" if (folder / "images").is_dir() else folder
    if not images.is_dir() or not any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir()):
        raise ValueError(f"no .tif images in {images} (an unlabelled folder holds images, or images/ of them)")
    return UnlabelledSource(f"{folder.name}-unlabelled", images, None, weight)


def image_paths(source: UnlabelledSource) -> list[Path]:
    """The source's image files, sorted by name."""
    paths = sorted(p for p in source.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if source.stems is not None:
        wanted = set(source.stems)
        paths = [p for p in paths if p.stem in wanted]
        missing = wanted - {p.stem for p in paths}
        if missing:
            raise ValueError(f"{len(missing)} images of {source.name} are not in {source.folder} (e.g. {sorted(missing)[0]})")
    if not paths:
        raise ValueError(f"no .tif images in {source.folder}")
    return paths


def teacher_instances(teacher: ModelSegmenter, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(image at the model's scale, the teacher's instances on it, the rescale factor), inputs decided as for a user's image."""
    if np.ndim(raw) != 2 and not (np.ndim(raw) == 3 and np.shape(raw)[-1] in (3, 4)):
        raise ValueError(f"unlabelled images must be 2D (gray or RGB), got shape {np.shape(raw)}")
    outputs: dict = {}  # the size estimate's network outputs: the chosen pass is not run again

    def cache(key, compute):
        hit = key in outputs
        if not hit:
            outputs[key] = compute()
        return outputs[key], hit

    with torch.inference_mode():
        decision = decide_inputs(teacher, raw, cache=cache)
        scale = rescale_factor(decision.diameter, teacher.train_diameter)
        image = working_image(channel_image(raw, decision.channel), invert=decision.invert, scale=scale).astype(np.float32)
        chosen = next((o for (_, inputs, _), o in outputs.items() if inputs == decision), None)
        output = network_output(teacher.model, image) if chosen is None else replace(chosen, image_shape=chosen.full_shape)
        instances = decode_output(output, teacher.decode_settings)[0]  # decoded at the model's scale
    return image, instances.astype(np.int32), scale


def _cache_key(teacher: ModelSegmenter, names: list[str]) -> str:
    """What a cache file must have been made for: the images and the teacher's decoder settings."""
    return json.dumps({"names": names, "decode": teacher.decode_settings.to_dict()}, sort_keys=True)


def load_pseudo_cache(path: Path, key: str) -> list[Sample] | None:
    """Samples from :func:`save_pseudo_cache`, or None if the file is absent or made for other images or settings."""
    if not path.exists():
        return None
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        names, scales = json.loads(meta["names"]), json.loads(meta["scales"])
        return [Sample(n, f.get_tensor(f"{i}/image").numpy(), f.get_tensor(f"{i}/instances").numpy(), s)
                for i, (n, s) in enumerate(zip(names, scales))]


def save_pseudo_cache(samples: list[Sample], path: Path, key: str) -> None:
    """Write decoded samples (image at the model's scale, instances) atomically to one safetensors file."""
    tensors = {}
    for i, s in enumerate(samples):
        tensors[f"{i}/image"] = torch.from_numpy(np.ascontiguousarray(s.image))
        tensors[f"{i}/instances"] = torch.from_numpy(np.ascontiguousarray(s.labels))
    meta = {"key": key, "names": json.dumps([s.name for s in samples]), "scales": json.dumps([s.scale for s in samples])}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, path, meta, overwrite=True)


def decode_unlabelled(teacher: ModelSegmenter, sources: list[UnlabelledSource], cache_file: Path | None = None,
                      on_image: Callable[[int, int], None] | None = None) -> list[list[Sample]]:
    """Per source, samples of its images at the model's scale whose labels are the teacher's instances (decoded once).

    Sample names are ``SOURCE:STEM``. ``cache_file`` keeps them on disk between runs on the same
    teacher (the caller keeps one file per teacher); it is redone for other images or decoder settings.
    """
    paths = [image_paths(s) for s in sources]
    names = [f"{s.name}:{p.stem}" for s, ps in zip(sources, paths) for p in ps]
    key = _cache_key(teacher, names)
    flat = load_pseudo_cache(cache_file, key) if cache_file is not None else None
    if flat is None:
        flat = []
        for i, (name, path) in enumerate(zip(names, (p for ps in paths for p in ps))):
            image, instances, scale = teacher_instances(teacher, read_tiff(path))
            flat.append(Sample(name, image, instances, scale))
            if on_image is not None:
                on_image(i + 1, len(names))
        if cache_file is not None:
            save_pseudo_cache(flat, cache_file, key)
    out, start = [], 0
    for ps in paths:
        out.append(flat[start : start + len(ps)])
        start += len(ps)
    return out
