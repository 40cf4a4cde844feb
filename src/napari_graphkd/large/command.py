"""``graphkd segment`` on Zarr/OME-Zarr inputs, large TIFFs and volumes over the in-memory limit: the chunked path, on a Dask cluster."""
from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from ..preprocess import InputError
from .chunks import DEFAULT_CHUNK
from .zarr_io import LabelsTarget, Source, default_target, open_image

LARGE_IMAGE_PIXELS = 50_000_000  # planes larger than this (~7k x 7k) take the chunked path automatically
RULES_WINDOW = 1024  # automatic input rules are decided on this central window of the first plane (middle plane of a volume)


def sides_arg(text: str) -> int | tuple[int, int, int]:
    """``--chunk``/``--halo``: one whole number (px; a volume's in-plane side) or three, Z,Y,X (voxels)."""
    try:
        values = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor three (Z,Y,X)") from None
    if len(values) not in (1, 3) or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected one or three (Z,Y,X) whole numbers >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the chunked path on the ``segment`` parser."""
    group = parser.add_argument_group("large images and volumes (Zarr/OME-Zarr inputs, TIFFs over 50 Mpx and, for a "
                                      "3D model, volumes over its in-memory limit take this path)")
    group.add_argument("--chunked", action="store_true", help="segment chunk by chunk into a Zarr labels array")
    group.add_argument("--chunk", type=sides_arg, default=None, metavar="PX|Z,Y,X",
                       help=f"chunk size in px (default {DEFAULT_CHUNK}); 3D models: the in-plane side, z in proportion "
                            "to the voxel size, or Z,Y,X voxels (default: about 160 voxels at the model's scale)")
    group.add_argument("--halo", type=sides_arg, default=None, metavar="PX|Z,Y,X",
                       help="context read around each chunk in px (default: 128 at the training scale; 3D models: the "
                            "training diameter plus the network's and decoder's reach, per axis)")
    group.add_argument("--workers", type=int, default=1,
                       help="local Dask worker processes (default 1; 0 = run here without Dask)")
    group.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786")
    group.add_argument("--labels-name", default="graphkd", help="name of the labels group inside an OME-Zarr input")


def is_chunked_input(path: str, args: argparse.Namespace | None = None) -> bool:
    """Zarr inputs, TIFFs whose planes exceed LARGE_IMAGE_PIXELS and, for a 3D model (``args.model``),
    TIFF volumes it would rescale to more than its in-memory limit go the chunked way."""
    p = Path(path)
    if p.suffix.lower() == ".zarr" or (p.is_dir() and any((p / n).exists() for n in ("zarr.json", ".zgroup", ".zarray"))):
        return True
    if p.is_file() and p.suffix.lower() in (".tif", ".tiff"):
        try:
            source = open_image(p)
        except InputError:
            return False
        h, w = source.plane_shape
        return h * w > LARGE_IMAGE_PIXELS or (args is not None and volume_over_limit(source, args))
    return False


def volume_over_limit(source: Source, args: argparse.Namespace) -> bool:
    """Whether a 3D model would rescale this (Z,Y,X) volume to more voxels than it segments in memory."""
    if "z" not in source.axes or args.model == "classical":
        return False
    from ..inference import MAX_WORKING_VOXELS, working_shape
    from ..segment import volume_scale
    from .worker import cached_segmenter

    segmenter = cached_segmenter(args.model)
    if segmenter.ndim != 3:
        return False
    diameter = None if args.diameter == "auto" else args.diameter
    scale = volume_scale(diameter, segmenter.train_diameter, args.voxel_size, segmenter.voxel_size)
    try:
        zyx = source.as_volume().spatial_shape
    except InputError:  # colour: the in-memory path says why it cannot segment it as a volume
        return False
    return math.prod(working_shape(zyx, scale)) > MAX_WORKING_VOXELS


def wants_chunked(args: argparse.Namespace) -> bool:
    """Whether ``graphkd segment`` takes the chunked path for these arguments."""
    return bool(getattr(args, "chunked", False)) or any(is_chunked_input(p, args) for p in args.inputs)


def targets(args: argparse.Namespace, sources: list[Source]) -> list[LabelsTarget]:
    """Output of each input: ``--out X.zarr`` (one input), ``--out FOLDER`` -> FOLDER/<stem>.zarr, or inside an OME-Zarr input."""
    if args.out is None:
        return [default_target(s, None, args.labels_name) for s in sources]
    out = Path(args.out)
    if out.suffix == ".zarr":
        if len(sources) > 1:
            raise InputError("--out names one .zarr but several inputs were given; give a folder instead")
        return [default_target(sources[0], out)]
    return [default_target(s, out / f"{Path(s.path).stem}.zarr") for s in sources]


def client_for(args: argparse.Namespace, stack: ExitStack):
    """A Dask client: the given scheduler, or a local cluster of ``--workers`` processes; None for ``--workers 0``."""
    if args.scheduler is None and args.workers == 0:
        return None
    from distributed import Client, LocalCluster

    if args.scheduler:
        return stack.enter_context(Client(args.scheduler))
    import dask

    # distributed sets MALLOC_TRIM_THRESHOLD_ for its workers, which turns off glibc's adaptive mmap threshold:
    # every large temporary array is then mapped and unmapped afresh, doubling the time per chunk
    stack.enter_context(dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}))
    cluster = stack.enter_context(LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None))
    return stack.enter_context(Client(cluster))


def decide_rules(source: Source, args: argparse.Namespace) -> tuple[float | None, bool | None]:
    """(diameter, invert) for the chunked run: ``auto`` decided on a central window of the first plane (luminance only).

    For a 3D model, as for its volumes in memory: ``auto`` diameter is the model's own scale, the
    inversion is decided on a central window of the middle plane of the first volume.
    """
    if args.channel == "hematoxylin":
        raise InputError("the chunked path reads luminance only; pass --channel luminance or auto")
    if "auto" not in (args.diameter, args.invert):
        return args.diameter, args.invert
    from ..preprocess import detect_polarity
    from ..segment import decide_inputs
    from .worker import cached_segmenter

    segmenter = cached_segmenter(args.model)
    (h, w), n = source.plane_shape, RULES_WINDOW
    y, x = max(0, (h - n) // 2), max(0, (w - n) // 2)
    if getattr(segmenter, "ndim", 2) == 3:
        volume = source.as_volume()
        z = volume.spatial_shape[0] // 2
        window = volume.read(0, (z, z + 1, y, min(h, y + n), x, min(w, x + n)))[0]
        invert = detect_polarity(window) if args.invert == "auto" else args.invert
        print(f"{Path(source.path).name or 'volume'}: input rules {'inverted' if invert else 'not inverted'}"
              f"{' (auto)' if args.invert == 'auto' else ''}, decided on a central {window.shape[0]}x{window.shape[1]} "
              f"window of plane {z}", flush=True)
        return (None if args.diameter == "auto" else args.diameter), invert
    window = source.read(0, (y, min(h, y + n), x, min(w, x + n)))
    decision = decide_inputs(segmenter, window, args.diameter, args.invert, "luminance")
    print(f"{Path(source.path).name or 'image'}: input rules {decision.describe()} (decided on a central "
          f"{window.shape[0]}x{window.shape[1]} window)", flush=True)
    return decision.diameter, decision.invert


class StageBar:
    """One tqdm bar per stage on stderr."""

    def __init__(self):
        self.stage, self.bar = None, None

    def update(self, progress) -> None:
        """Show a progress record."""
        from tqdm import tqdm

        if progress.stage in ("done", "stopped"):
            return self.close()
        if progress.stage != self.stage:
            self.close()
            self.stage = progress.stage
            self.bar = tqdm(total=progress.total, initial=progress.done, desc=progress.stage, file=sys.stderr, leave=False)
        self.bar.n = progress.done
        self.bar.refresh()

    def close(self) -> None:
        """Close the open bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def segment_chunked(args: argparse.Namespace) -> int:
    """``graphkd segment`` for large inputs: one Zarr labels array per input."""
    from .run import ChunkError, DaskExecutor, run_to_end, segment_large

    sources = [open_image(p) for p in args.inputs]
    outputs = targets(args, sources)
    with ExitStack() as stack:
        client = client_for(args, stack)
        executor = DaskExecutor(client) if client is not None else None
        where = f"Dask scheduler {args.scheduler}" if args.scheduler else f"{args.workers} local worker(s)" if client else "this process"
        for source, target in zip(sources, outputs):
            start = time.perf_counter()
            diameter, invert = decide_rules(source, args)
            bar = StageBar()
            try:
                last = run_to_end(segment_large(source, target, args.model, chunk=args.chunk, halo=args.halo,
                                                diameter=diameter, invert=invert, tile=args.tile,
                                                voxel_size=args.voxel_size, executor=executor, threads=args.threads or 1,
                                                overwrite=args.overwrite), bar.update)
            except ChunkError as exc:
                bar.close()
                print(f"graphkd segment: error: {exc} (finished chunks are kept: run the same command to resume)", file=sys.stderr)
                return 2
            bar.close()
            seconds = time.perf_counter() - start
            mpx = math.prod(source.shape) / (source.shape[source.axes.index("c")] if "c" in source.axes else 1) / 1e6
            print(f"{Path(source.path).name}: {last.message} -> {target.array_path} "
                  f"({mpx:.1f} Mpx in {seconds:.1f} s, {mpx / seconds:.2f} Mpx/s on {where})", flush=True)
    return 0
