"""Lazy inputs (Zarr, OME-Zarr, large TIFF, in-memory arrays) and the Zarr labels output with its work folder."""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..planes import plane_layout
from ..preprocess import InputError

LABELS_DTYPE = np.int32
WORK_SUFFIX = ".partial"  # <labels array>.partial/ holds an unfinished run; removed when the run completes


@dataclass(frozen=True)
class Source:
    """A 2D image, a stack of planes or a (Z,Y,X) volume, read box by box; axes use the letters t, c, z, y, x.

    Planes (``volume`` False) are y-x; every other axis but c is a plane axis. Volumes (``volume``
    True, for 3D models) are z-y-x; other axes but c (time) count volumes.
    """

    kind: str  # "zarr", "tiff" or "array"
    axes: str
    shape: tuple[int, ...]
    dtype: str
    path: str = ""
    component: str = ""  # array inside a Zarr group (OME-Zarr level 0), or "" for a root array
    ome: dict | None = None  # OME-Zarr multiscales entry of the image (axes, transforms, version)
    array: Any = field(default=None, compare=False, repr=False)  # kind == "array": numpy or dask array
    volume: bool = False  # z is a spatial axis (3D chunks), not a plane axis

    @property
    def spatial(self) -> str:
        """The spatial axes a chunk spans: ``yx``, or ``zyx`` for volumes."""
        return "zyx" if self.volume else "yx"

    @property
    def lead_axes(self) -> list[int]:
        """Positions of the axes segmented plane (volume) by plane (everything but the spatial axes and c)."""
        return [i for i, a in enumerate(self.axes) if a not in self.spatial + "c"]

    @property
    def planes(self) -> int:
        """Number of 2D planes (volumes, for a volume source)."""
        return int(np.prod([self.shape[i] for i in self.lead_axes], dtype=np.int64))

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(height, width) of one plane."""
        return self.shape[self.axes.index("y")], self.shape[self.axes.index("x")]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of one plane (height, width) or volume (depth, height, width)."""
        return tuple(self.shape[self.axes.index(a)] for a in self.spatial)

    @property
    def labels_axes(self) -> str:
        """Axes of the labels: the image's without the channel axis."""
        return self.axes.replace("c", "")

    @property
    def labels_shape(self) -> tuple[int, ...]:
        """Shape of the labels array."""
        return tuple(n for n, a in zip(self.shape, self.axes) if a != "c")

    def plane_index(self, plane: int) -> tuple[int, ...]:
        """Index of plane (volume) number ``plane`` along the lead axes."""
        return tuple(int(i) for i in np.unravel_index(plane, [self.shape[i] for i in self.lead_axes])) if self.lead_axes else ()

    def index(self, plane: int, box: tuple[int, ...], drop_channel: bool = False) -> tuple:
        """Index tuple selecting ``box`` (a start, stop pair per spatial axis) of a plane or volume (in the image, or
        in the labels with ``drop_channel``)."""
        lead = iter(self.plane_index(plane))
        parts = []
        for a in self.axes:
            if a in self.spatial:
                i = 2 * self.spatial.index(a)
                parts.append(slice(box[i], box[i + 1]))
            elif a == "c":
                if not drop_channel:
                    parts.append(slice(None))
            else:
                parts.append(next(lead))
        return tuple(parts)

    def read(self, plane: int, box: tuple[int, ...]) -> np.ndarray:
        """Pixels of ``box`` in one plane as (h, w) or (h, w, channels); in one volume as (d, h, w)."""
        array = self.array if self.kind == "array" else _open(self.kind, self.path, self.component)
        data = np.asarray(array[self.index(plane, box)])
        kept = [a for a in self.axes if a in self.spatial + "c"]
        if "c" in kept:
            data = np.moveaxis(data, kept.index("c"), -1)
            data = data[..., 0] if data.shape[-1] == 1 else data
        return data

    def as_volume(self) -> "Source":
        """The same source read as (Z,Y,X) volumes (for a 3D model); InputError when it has no z axis or has colour."""
        if self.volume:
            return self
        if "z" not in self.axes:
            raise InputError(f"a 3D model segments (Z,Y,X) volumes; the image has axes {self.axes!r} and shape {self.shape}")
        if "c" in self.axes and self.shape[self.axes.index("c")] > 1:
            raise InputError(f"volumes are read as gray values; the image has {self.shape[self.axes.index('c')]} channels")
        return replace(self, volume=True)

    def without_array(self) -> "Source":
        """A copy that does not carry an in-memory array (sent to workers that read files themselves)."""
        return replace(self, array=None)


@functools.lru_cache(maxsize=8)
def _open(kind: str, path: str, component: str):
    """A file source opened once per process (workers reuse it for every chunk)."""
    import zarr

    if kind == "tiff":
        import tifffile

        return zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
    return zarr.open_array(path, path=component or None, mode="r")


def infer_axes(shape: tuple[int, ...]) -> str:
    """Axes of a bare array by the pipeline's stack rule (:func:`plane_layout`): [t][z]yx[c]."""
    stack, plane = plane_layout(shape)
    return "tz"[2 - len(stack):] + ("yxc" if len(plane) == 3 else "yx")


def from_array(array: Any, axes: str | None = None) -> Source:
    """Source over a numpy, dask or zarr array, or a multiscale list of them (its full resolution: a napari layer's data)."""
    if isinstance(array, (list, tuple)):
        array = array[0]
    shape = tuple(int(n) for n in array.shape)
    return _checked(Source("array", axes or infer_axes(shape), shape, str(np.dtype(array.dtype)), array=array))


def _checked(source: Source) -> Source:
    """The source, or InputError when it has no y/x axes or more than one channel axis layout we cannot read."""
    if "y" not in source.axes or "x" not in source.axes or len(source.axes) != len(source.shape):
        raise InputError(f"cannot find the y and x axes of an image with axes {source.axes!r} and shape {source.shape}")
    if min(source.plane_shape) < 16:
        raise InputError(f"image planes are too small ({source.plane_shape}); need at least 16 px per side")
    return source


def _ome_multiscale(attrs: dict) -> dict | None:
    """The first ``multiscales`` entry of OME-Zarr group attributes (0.4 top level or 0.5 under ``ome``), with its version."""
    ome = attrs.get("ome", attrs)
    scales = ome.get("multiscales")
    if not scales:
        return None
    entry = dict(scales[0])
    entry["version"] = ome.get("version") or entry.get("version") or "0.4"
    return entry


def open_image(path: str | Path) -> Source:
    """Open a Zarr array, an OME-Zarr image (its full-resolution level) or a TIFF file, without reading pixels."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                letters, shape, dtype = series.axes.lower(), tuple(series.shape), str(series.dtype)
        except Exception as exc:  # tifffile raises many types for bad files
            raise InputError(f"cannot read {path} as TIFF: {exc}") from None
        channel = "s" if "s" in letters else "c"  # samples (RGB) or channels; any other axis is a plane axis
        axes = "".join(a if a in "yx" else "c" if a == channel else "z" for a in letters)
        return _checked(Source("tiff", axes, shape, dtype, str(path)))
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"cannot open {path} as Zarr: {exc}") from None
    if isinstance(node, zarr.Array):
        return _checked(Source("zarr", infer_axes(node.shape), tuple(node.shape), str(node.dtype), str(path)))
    entry = _ome_multiscale(dict(node.attrs))
    if entry is None:
        raise InputError(f"{path} is a Zarr group without OME-Zarr 'multiscales' metadata; give the path of an array")
    level = entry["datasets"][0]["path"]
    array = node[level]
    axes = "".join((a["name"] if isinstance(a, dict) else a)[0].lower() for a in entry.get("axes", [])) or infer_axes(array.shape)
    return _checked(Source("zarr", axes, tuple(array.shape), str(array.dtype), str(path), level, entry))


@dataclass(frozen=True)
class LabelsTarget:
    """Where the labels go: a Zarr array (``path``), inside an OME-Zarr image's ``labels/<name>`` group when ``ome_root`` is set."""

    path: str
    ome_root: str = ""
    name: str = ""

    @property
    def work(self) -> Path:
        """Folder of an unfinished run: records, local labels, matches."""
        return Path(self.path + WORK_SUFFIX)

    @property
    def array_path(self) -> str:
        """Path of the labels array itself."""
        return str(Path(self.path) / "0") if self.ome_root else self.path


def default_target(source: Source, out: str | Path | None, name: str = "graphkd") -> LabelsTarget:
    """``out`` (a ``.zarr`` path) when given; else the OME-Zarr input's ``labels/<name>``."""
    if out is not None:
        out = str(out)
        if not out.rstrip("/").endswith(".zarr"):
            raise InputError(f"chunked output must be a .zarr path, got {out}")
        return LabelsTarget(out.rstrip("/"))
    if source.ome is None:
        raise InputError("give an output .zarr path (only OME-Zarr inputs can hold their labels themselves)")
    return LabelsTarget(str(Path(source.path) / "labels" / name), source.path, name)


def remove_target(target: LabelsTarget) -> None:
    """Delete a previous result and its unfinished run (only on the user's explicit request)."""
    for p in (Path(target.path), target.work):
        if p.exists():
            shutil.rmtree(p)


def create_local_array(work: Path, planes: int, shape: tuple[int, ...], chunk: tuple[int, ...]):
    """The per-chunk labels before stitching (local ids), one Zarr chunk per core chunk."""
    import zarr

    return zarr.open_array(str(work / "local.zarr"), mode="a", shape=(planes, *shape), chunks=(1, *chunk),
                           dtype=LABELS_DTYPE, fill_value=0)


def open_local_array(work: Path):
    """The local-labels array of an unfinished run."""
    import zarr

    return zarr.open_array(str(work / "local.zarr"), mode="r+")


def zarr_format_of(source: Source) -> int:
    """Zarr format of an OME-Zarr input (labels are written in the same format)."""
    return 3 if str((source.ome or {}).get("version", "0.4")) >= "0.5" else 2


def create_labels_array(target: LabelsTarget, source: Source, chunk: tuple[int, ...]):
    """The final labels array, chunked like the core chunks (each chunk written by one task)."""
    import zarr

    shape = source.labels_shape
    chunks = tuple(chunk[source.spatial.index(a)] if a in source.spatial else 1 for a in source.labels_axes)
    fmt = zarr_format_of(source) if target.ome_root else 3
    names = {"dimension_names": list(source.labels_axes)} if fmt == 3 else {}
    return zarr.open_array(target.array_path, mode="a", shape=shape, chunks=chunks, dtype=LABELS_DTYPE,
                           fill_value=0, zarr_format=fmt, **names)


def open_labels_array(target: LabelsTarget):
    """The labels array, for writing chunks."""
    import zarr

    return zarr.open_array(target.array_path, mode="r+")


def finish_target(target: LabelsTarget, source: Source, provenance: dict) -> None:
    """Attach provenance; for OME-Zarr write the multiscales and image-label metadata and list the labels."""
    import zarr

    if not target.ome_root:
        array = open_labels_array(target)
        array.attrs["graphkd"] = provenance
        return
    from ome_zarr.format import format_from_version
    from ome_zarr.writer import add_metadata, get_metadata, write_label_metadata, write_multiscales_metadata

    fmt = format_from_version(str(source.ome["version"]))
    group = zarr.open_group(target.path, mode="a")
    group.attrs["graphkd"] = provenance
    transforms = [dict(t) for t in source.ome["datasets"][0].get("coordinateTransformations", [])]
    keep = [i for i, a in enumerate(source.axes) if a != "c"]
    for t in transforms:
        for key in ("scale", "translation"):
            if key in t:
                t[key] = [t[key][i] for i in keep]
    axes = [a for a, letter in zip(source.ome.get("axes", list(source.axes)), source.axes) if letter != "c"]
    write_multiscales_metadata(group, [{"path": "0", "coordinateTransformations": transforms}], fmt=fmt, axes=axes,
                               name=target.name)
    labels_group = str(Path(target.path).parent)
    write_label_metadata(zarr.open_group(labels_group, mode="a"), target.name, fmt=fmt, source={"image": "../../"})
    parent = zarr.open_group(labels_group, mode="a")  # a replaced result is listed once
    add_metadata(parent, {"labels": list(dict.fromkeys(get_metadata(parent).get("labels", [])))}, fmt=fmt)


def atomic_write_json(path: Path, data: dict) -> None:
    """Write JSON via a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` via a temporary file and ``os.replace`` (its existence records a finished chunk)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
