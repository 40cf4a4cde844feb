"""``graphkd`` command line: segment, evaluate, info, train, export (headless, for folders of TIFFs)."""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import uuid
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff")


class CLIError(Exception):
    """An error reported as one line and a non-zero exit."""


class Parser(argparse.ArgumentParser):
    """Argument parser whose errors are one line (``graphkd CMD: error: ...``, exit 2), like every other error."""

    def error(self, message: str):
        """Print one line and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def threads_arg(text: str) -> int:
    """``--threads``: a whole number >= 0 (0 = one per idle CPU, see runtime.py)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (one per idle CPU) or more, got {value}")
    return value


def diameter_arg(text: str) -> float | str:
    """``--diameter``: a positive, finite number of pixels, or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of pixels nor 'auto'") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {text}")
    return value


def voxel_size_arg(text: str) -> tuple[float, float, float]:
    """``--voxel-size Z,Y,X``: three positive, finite numbers (any one unit: only their ratios count)."""
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three numbers Z,Y,X (e.g. 4,1,1)") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three positive numbers Z,Y,X (e.g. 4,1,1), got {text!r}")
    return values  # type: ignore[return-value]


def check_volume_options(segmenter, volume: bool, voxel_size) -> None:
    """CLIError when --3d or --voxel-size is given for a model that segments planes (2D networks, classical)."""
    if segmenter.ndim == 3 or not (volume or voxel_size):
        return
    option = "--3d" if volume else "--voxel-size"
    raise CLIError(f"{option} needs a 3D model; {segmenter.name} is 2D and segments a stack plane by plane "
                   f"(drop {option}, or give --model a 3D checkpoint)")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """TIFF files named directly or found (non-recursively) in the named folders."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CLIError(f"no .tif/.tiff files in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CLIError(f"input not found: {path}")
    return files


def progress(iterable, total: int, desc: str):
    """tqdm progress bar on stderr (disabled for a single item)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=total < 2, file=sys.stderr, leave=False)


def image_bar(total: int):
    """tqdm bar over images on an interactive stderr, advanced per tile and plane (so one large image shows progress)."""
    from tqdm import tqdm

    return tqdm(total=total, desc="segment", unit="image", file=sys.stderr, leave=False, disable=None,
                bar_format="{l_bar}{bar}| {n:.1f}/{total} images [{elapsed}<{remaining}]")


def say(line: str, file=None) -> None:
    """Print a line (stdout by default) without breaking a running progress bar."""
    from tqdm import tqdm

    tqdm.write(line, file=file or sys.stdout)


def refuse_input_overwrite(inputs: list[str], files: list[Path], out_dir: Path, targets: list[Path]) -> None:
    """CLIError when ``out_dir`` is an input folder or an output would replace an input file (whatever the flags)."""
    for item in inputs:
        if Path(item).is_dir() and out_dir.exists() and os.path.samefile(item, out_dir):
            raise CLIError(f"--out {out_dir} is an input folder: label images would replace or mix with its images; "
                           "choose another folder")
    for source, target in zip(files, targets):
        if target.resolve() == source.resolve() or (target.exists() and os.path.samefile(source, target)):
            raise CLIError(f"output {target} would replace the input {source}; choose another --out")


def write_labels(target: Path, labels: np.ndarray) -> None:
    """Write a label image atomically (temporary file, then rename): a killed run leaves no half-written file."""
    import tifffile

    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        tifffile.imwrite(partial, labels.astype(np.uint16 if labels.max(initial=0) < 65536 else np.uint32), compression="zlib")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment TIFF files into OUT_DIR/<stem>.tif label images; files that fail are listed and the rest go on."""
    from .large.command import segment_chunked, wants_chunked

    if wants_chunked(args):  # Zarr inputs, large TIFFs, volumes over a 3D model's in-memory limit: chunk by chunk into Zarr
        from .large.worker import cached_segmenter

        check_volume_options(cached_segmenter(args.model), args.volume, args.voxel_size)
        if args.runtime != "torch":
            raise CLIError("--runtime onnx runs whole images only; chunked (Zarr, large TIFF) segmentation uses torch")
        return segment_chunked(args)
    from .data import read_tiff
    from .guidance import assess
    from .preprocess import InputError
    from .runtime import configure_threads
    from .segment import load_segmenter, segment_any

    if args.out is None:
        raise CLIError("--out is required (a folder for the label TIFFs)")
    configure_threads(args.threads)
    files = expand_inputs(args.inputs)
    out_dir = Path(args.out)
    targets = [out_dir / f"{f.stem}.tif" for f in files]
    refuse_input_overwrite(args.inputs, files, out_dir, targets)
    if len({t.name for t in targets}) != len(targets):
        raise CLIError("two inputs share a file name; outputs would collide")
    todo = [(f, t) for f, t in zip(files, targets) if args.overwrite or not t.exists()]
    tile = {} if args.tile is None else {"tile": args.tile}
    segmenter = load_segmenter(args.model)
    check_volume_options(segmenter, args.volume, args.voxel_size)
    if args.runtime == "onnx":
        if segmenter.ndim == 3:
            raise CLIError("--runtime onnx runs 2D models; a 3D model runs with torch")
        use_onnx_runtime(segmenter, args.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"model {segmenter.name}: {segmenter.parameters:,} parameters"
          + (", 3D: (Z,Y,X) images are segmented as volumes" if segmenter.ndim == 3 else ""))
    description = segmenter.describe()
    print(f"{'image':<40} {'objects':>7} {'network ms':>10} {'decode ms':>9}  input rules (auto: chosen per image)")
    net_total = dec_total = 0.0
    done, failed = 0, []
    bar = image_bar(len(todo))
    for i, (path, target) in enumerate(todo):
        try:
            image = read_tiff(path)
            result = segment_any(segmenter, image, diameter=args.diameter, invert=args.invert,
                                 channel=args.channel, **tile, volume=args.volume or None, voxel_size=args.voxel_size,
                                 on_progress=lambda fraction, i=i: bar.update(i + fraction - bar.n))
            write_labels(target, result.labels)
        except (InputError, ValueError, OSError, MemoryError) as exc:
            failed.append(path.name)
            say(f"graphkd segment: {path.name}: {exc or type(exc).__name__}", file=sys.stderr)
            continue
        done += 1
        net_total += result.network_seconds
        dec_total += result.decode_seconds
        say(f"{path.name:<40} {result.objects:>7d} {1000 * result.network_seconds:>10.0f} "
            f"{1000 * result.decode_seconds:>9.0f}  {result.inputs.describe()}")
        for line in assess(result, description, first_plane(image)):
            say(f"  advice for {path.name}: {line}", file=sys.stderr)
    bar.close()
    k = max(1, done)
    print(f"{'mean':<40} {'':>7} {1000 * net_total / k:>10.0f} {1000 * dec_total / k:>9.0f}")
    skipped = len(files) - len(todo)
    print(f"{done} segmented, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
          + (f"; {skipped} skipped (output exists; --overwrite to redo)" if skipped else ""))
    return 1 if failed else 0


def use_onnx_runtime(segmenter, threads: int) -> None:
    """``--runtime onnx``: the segmenter's network runs in onnxruntime (same labels; faster for the teacher on CPU)."""
    if segmenter.kind != "network":
        raise CLIError("--runtime onnx runs a network; the classical pipeline has none")
    try:
        from .models.onnx import OnnxNetwork

        segmenter.model = OnnxNetwork(segmenter.model, threads=threads)
    except ImportError as exc:
        raise CLIError(str(exc)) from None


def first_plane(image: np.ndarray) -> np.ndarray:
    """The first plane of a stack (the image itself when 2D), by the one stack rule."""
    from .planes import plane_layout

    stack, _ = plane_layout(image.shape)
    return image[(0,) * len(stack)]


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Metrics of predicted label images against ground truth, matched by file name."""
    from .data import read_tiff
    from .metrics import as_labels, evaluate, mean_metrics

    gt_files = {p.stem: p for p in expand_inputs([args.gt])}
    pred_files = {p.stem: p for p in expand_inputs([args.pred])}
    common = sorted(set(gt_files) & set(pred_files))
    if not common:
        raise CLIError(f"no file names in common between {args.gt} and {args.pred}")
    missing = sorted(set(gt_files) - set(pred_files))
    rows = {}
    for name in common:
        gt, pred = read_tiff(gt_files[name]), read_tiff(pred_files[name])
        if gt.shape != pred.shape:
            raise CLIError(f"{name}: ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        rows[name] = evaluate(as_labels(gt, f"{gt_files[name]}"), as_labels(pred, f"{pred_files[name]}"))
    mean = mean_metrics(list(rows.values()))
    if args.json:
        print(json.dumps({"per_image": rows, "mean": mean, "missing_predictions": missing}, indent=1))
        return 0
    keys = ["acc@0.5", "f1@0.5", "pq", "dq", "sq", "aji", "sbd", "abs_dic", "n_gt", "n_pred"]
    print(f"{'image':<32}" + "".join(f"{k:>9}" for k in keys))
    for name, row in list(rows.items()) + [(f"mean of {len(rows)} images", mean)]:
        print(f"{name:<32}" + "".join(f"{row[k]:>9.3f}" if k not in ("n_gt", "n_pred", "abs_dic") else f"{row[k]:>9.1f}" for k in keys))
    if missing:
        print(f"warning: {len(missing)} ground-truth images have no prediction (e.g. {missing[0]})", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print a model's metadata and parameter count."""
    from .segment import load_segmenter

    info = load_segmenter(args.model).describe()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key in ("name", "architecture", "parameters", "ndim", "voxel_size", "path", "config", "decode",
                    "train_diameter", "training_data", "command", "step", "metrics", "package_version"):
            if key in info:
                print(f"{key:>15}: {describe_value(key, info[key])}")
    return 0


def describe_value(key: str, value) -> str:
    """How ``graphkd info`` prints a metadata value (dimensionality and voxel size in words)."""
    if key == "ndim":
        return "3D: segments (Z,Y,X) volumes as a whole" if value == 3 else "2D: segments images, stacks plane by plane"
    if key == "voxel_size" and value is not None:
        return ":".join(f"{v:g}" for v in value) + " (z:y:x of its training volumes; --voxel-size rescales to it)"
    return str(value)


def arch_ndim(arch: str) -> int:
    """2 or 3: what a named architecture segments; CLIError naming the known ones otherwise."""
    from .models import NAMED_CONFIGS

    if arch not in NAMED_CONFIGS:
        raise CLIError(f"unknown architecture {arch!r}; known: {', '.join(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[arch].ndim


def check_data_ndim(option: str, name: str, ndim: int, folders: list[Path]) -> None:
    """CLIError when a training folder holds images for a 3D network or volumes for a 2D one."""
    from .data import folder_ndim

    volumes3d = ", ".join(n for n, c in _named_by_ndim().items() if c == 3)
    for folder in folders:
        found = folder_ndim(folder)
        if found == ndim:
            continue
        if ndim == 3:
            raise CLIError(f"{option} {name} is 3D: {folder}/images must hold (Z,Y,X) volumes, it holds 2D images")
        raise CLIError(f"{folder}/images holds (Z,Y,X) volumes: {option} {name} is 2D; choose a 3D one ({volumes3d})")


def _named_by_ndim() -> dict[str, int]:
    """Named architectures and their dimensionality."""
    from .models import NAMED_CONFIGS

    return {name: config.ndim for name, config in NAMED_CONFIGS.items()}


class TrainingBar:
    """tqdm bar fed by training progress records (opened at the first record, so resumes start right)."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def update(self, record: dict) -> None:
        """Advance by one step and show the loss."""
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=record["total"], initial=record["step"] - 1, desc=self.desc, file=sys.stderr)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")

    def close(self) -> None:
        """Close the bar if it was opened."""
        if self.bar is not None:
            self.bar.close()


def sources_validator(tune):
    """Validation callback: metrics on the tune images of each source (every source counts the same), also printed."""
    from .decode.mws import DecodeSettings
    from .evaluation import network_outputs, score_by_source

    samples = [s for group in tune.values() for s in group]
    score = score_by_source({name: len(group) for name, group in tune.items()})

    def validate(model):
        scores = score(network_outputs(model, samples), samples, DecodeSettings())
        parts = "; ".join(f"{n} f1@0.5 {scores[f'{n}/f1@0.5']:.3f} aji {scores[f'{n}/aji']:.3f}" for n in tune if tune[n])
        print(f"\nvalidation: {parts}; score {scores['score']:.3f}", file=sys.stderr, flush=True)
        return scores

    return validate


def parse_sources(specs: list[str], weights: list[float] | None, n_tune: int) -> list:
    """``--data`` sources with their ``--source-weights`` (default equal), each announced on stderr (by rank 0)."""
    from .data import parse_source
    from .train import distributed

    weights = weights or [1.0] * len(specs)
    if len(weights) != len(specs) or min(weights) <= 0:
        raise CLIError(f"--source-weights needs one positive weight per --data ({len(specs)})")
    sources = [parse_source(spec, n_tune, w) for spec, w in zip(specs, weights)]
    for source in sources if distributed.is_main() else ():
        split = f"{len(source.train)} listed" if source.train is not None else "all other"
        print(f"source {source.name}: {source.folder} ({split} images to train, {len(source.tune)} to tune, weight {source.weight:g})",
              file=sys.stderr)
    return sources


def cmd_train(args: argparse.Namespace) -> int:
    """Train a teacher (or a student without distillation) on one or more sources, validating on their tune images."""
    from .data import AugmentConfig
    from .runtime import configure_threads
    from .train import distributed
    from .train.loop import TrainSettings
    from .train.segmentation import train_segmentation

    configure_threads(args.threads or distributed.threads_per_process())  # 0: idle CPUs, shared by this machine's processes
    distributed.setup()  # one process of several under torchrun: rank 0 alone reports
    distributed.check_batch_size(args.batch_size)
    sources = parse_sources(args.data, args.source_weights, args.n_tune)
    check_data_ndim("--arch", args.arch, arch_ndim(args.arch), [s.folder for s in sources])
    if arch_ndim(args.arch) == 3:
        return train_volume_command(args, sources)
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        validate_every=args.validate_every, snapshot_every=args.validate_every,
        augment=AugmentConfig(crop=args.crop, elastic=args.elastic, scale_range=tuple(args.scale_range),
                              acquisition_prob=args.acquisition_aug),
    )
    bar = TrainingBar("train")
    progress_record = train_segmentation(
        sources, args.out, args.arch, settings, init_checkpoint=args.init,
        command="graphkd " + shlex.join(args.argv), validate_factory=sources_validator, on_progress=bar.update,
    )
    bar.close()
    if distributed.is_main():
        print(f"finished at step {progress_record['step']}; best on tune split: {progress_record['best']}")
        print(f"checkpoints in {args.out} (best.safetensors, last.safetensors)")
    distributed.shutdown()
    return 0


def volume_sets(sources) -> tuple[list, list]:
    """(train, tune) volume samples of the sources (normalised as a whole, not rescaled: 3D runs use voxel sizes).

    A folder split by ``--n-tune`` keeps at least one volume to train on (a single volume: no tune volume).
    """
    from dataclasses import replace

    from .data import load_source, split_tune

    train, tune = [], []
    for source in sources:
        if source.train is None and source.tune_folder is None:  # held out by --n-tune
            names = sorted(p.stem for p in (source.folder / "images").iterdir() if p.suffix in (".tif", ".tiff"))
            if len(source.tune) >= len(names):
                source = replace(source, tune=tuple(split_tune(names, len(names) - 1, seed=0)[1]))
        part_train, part_tune = load_source(source, diameter=None)
        train, tune = train + part_train, tune + part_tune
    if not train:
        raise CLIError("no volume to train on: every volume of --data is a tune volume")
    return train, tune


def volume_validator(tune: list, offsets):
    """Validation on held-out volumes: 3D F1@0.5 and AJI of the model's segmentation (default decoder, ``offsets``)."""
    from .decode.mws import DecodeSettings
    from .decode.policy import decode_output
    from .evaluation import selection_score
    from .inference import network_output
    from .metrics import evaluate, mean_metrics

    def validate(model) -> dict:
        was_training = model.training
        model.eval()
        outputs = [network_output(model, s.image, offsets=offsets) for s in tune]
        model.train(was_training)
        per_volume = [evaluate(s.labels, decode_output(o, DecodeSettings(), offsets)[0]) for o, s in zip(outputs, tune)]
        scores = dict(mean_metrics(per_volume), score=selection_score(per_volume))
        print(f"\nvalidation on {len(tune)} volume(s): f1@0.5 {scores['f1@0.5']:.3f} aji {scores['aji']:.3f}",
              file=sys.stderr, flush=True)
        return scores

    return validate if tune else None


def check_single_process(command: str) -> None:
    """CLIError for a 3D run launched as several processes (distributed runs train 2D networks)."""
    from .train import distributed

    if distributed.launched():
        raise CLIError(f"{command} of 3D networks runs as one process; start it without torchrun")


def train_volume_command(args: argparse.Namespace, sources) -> int:
    """``graphkd train`` of a 3D architecture on volume folders (random 3D crops, y-x turns, intensity jitter)."""
    from .data import AugmentConfig
    from .train.loop import TrainSettings
    from .train.segmentation import train_volumes
    from .train.volumes import volume_offsets

    check_single_process("training")
    if args.source_weights:
        raise CLIError("--source-weights applies to 2D training; 3D training draws from every volume alike")
    train, tune = volume_sets(sources)
    print(f"{len(train)} volume(s) to train, {len(tune)} to tune; crops {args.volume_crop} (z, y, x); voxel size "
          + (":".join(f"{v:g}" for v in args.voxel_size) if args.voxel_size else "isotropic"), file=sys.stderr)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             validate_every=args.validate_every, snapshot_every=args.validate_every,
                             augment=AugmentConfig())
    bar = TrainingBar("train")
    record = train_volumes(train, args.out, args.arch, settings, crop=args.volume_crop, voxel_size=args.voxel_size,
                           init_checkpoint=args.init, command="graphkd " + shlex.join(args.argv),
                           validate=volume_validator(tune, volume_offsets(args.voxel_size)), on_progress=bar.update)
    bar.close()
    print(f"finished at step {record['step']}; best on tune volumes: {record.get('best')}")
    print(f"checkpoints in {args.out} (best.safetensors, last.safetensors)")
    return 0


def distill_volume_command(args: argparse.Namespace, teacher, sources, settings, distill) -> int:
    """``graphkd distill`` of a 3D student from a 3D teacher on volume folders (the teacher's offsets and voxel size)."""
    from .train.distill import distill_volume_student

    check_single_process("distillation")
    if args.unlabelled or args.source_weights:
        raise CLIError("--unlabelled and --source-weights apply to 2D distillation; 3D distillation uses the --data volumes")
    train, tune = volume_sets(sources)
    print(f"distilling {args.init or args.student} from {teacher.path} with {args.method} on {len(train)} volume(s) "
          f"({len(tune)} to tune): {distill.weights.active() or 'no KD terms'}", file=sys.stderr)
    bar = TrainingBar("distill")
    record = distill_volume_student(teacher.path, train, args.out, args.student,
                                    settings, distill,
                                    crop=args.volume_crop, command="graphkd " + shlex.join(args.argv),
                                    validate=volume_validator(tune, teacher.offsets), on_progress=bar.update,
                                    on_status=lambda m: print(m, file=sys.stderr, flush=True), init_checkpoint=args.init)
    bar.close()
    print(f"finished at step {record['step']}; best on tune volumes: {record.get('best')}")
    return 0


def parse_weights(method: str, overrides: list[str], config: str | None):
    """Term weights of a method, updated by a JSON config file and then by NAME=VALUE overrides."""
    from dataclasses import fields, replace

    from .distill import method_weights

    weights = method_weights(method)
    names = {f.name for f in fields(weights)}
    updates: dict[str, float] = {}
    if config:
        try:
            loaded = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CLIError(f"cannot read config {config}: {exc}") from None
        updates.update(loaded.get("weights", {}))
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--weight expects NAME=VALUE, got {item!r}")
        try:
            updates[name] = float(value)
        except ValueError:
            raise CLIError(f"--weight {name}: {value!r} is not a number") from None
    unknown = set(updates) - names
    if unknown:
        raise CLIError(f"unknown loss term(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    return replace(weights, **updates)


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a student from a teacher checkpoint with switchable, weighted terms."""
    from .data import AugmentConfig
    from .runtime import configure_threads
    from .segment import load_segmenter
    from .train import distributed
    from .train.distill import PSEUDO, DistillSettings, distill_student
    from .train.loop import TrainSettings
    from .train.pseudo import parse_unlabelled

    distributed.setup()  # one process of several under torchrun: rank 0 alone reports
    distributed.check_batch_size(args.batch_size)
    weights = parse_weights(args.method, args.weight or [], args.config)
    teacher = load_segmenter(args.teacher)
    if teacher.kind != "network":
        raise CLIError("the teacher must be a network checkpoint")
    if args.method == PSEUDO and not args.unlabelled:
        raise CLIError(f"--method {PSEUDO} trains on the teacher's labels of --unlabelled images: give at least one")
    configure_threads(args.threads or distributed.threads_per_process())
    n_data = len(args.data)
    weights_all = args.source_weights or [1.0] * (n_data + len(args.unlabelled))
    if len(weights_all) != n_data + len(args.unlabelled):
        raise CLIError(f"--source-weights needs one weight per --data and --unlabelled ({n_data + len(args.unlabelled)})")
    sources = parse_sources(args.data, weights_all[:n_data], args.n_tune)
    unlabelled = [parse_unlabelled(spec, w) for spec, w in zip(args.unlabelled, weights_all[n_data:])]
    for u in unlabelled if distributed.is_main() else ():
        print(f"unlabelled {u.name}: {u.folder} ({'all' if u.stems is None else len(u.stems)} images, weight {u.weight:g})",
              file=sys.stderr)
    init = load_segmenter(args.init) if args.init else None  # a bundled name or a checkpoint file (never runs code)
    if init is not None and init.kind != "network":
        raise CLIError("--init must be a network checkpoint")
    student_ndim = init.ndim if init is not None else arch_ndim(args.student)
    if student_ndim != teacher.ndim:
        raise CLIError(f"the teacher is {teacher.ndim}D and --student {args.student} is {student_ndim}D; "
                       f"choose a {teacher.ndim}D student ({', '.join(n for n, d in _named_by_ndim().items() if d == teacher.ndim)})")
    check_data_ndim("--init" if init is not None else "--student", args.init or args.student, student_ndim,
                    [s.folder for s in sources])
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             validate_every=args.validate_every, snapshot_every=args.validate_every,
                             augment=AugmentConfig(crop=args.crop, acquisition_prob=args.acquisition_aug))
    distill = DistillSettings(method=args.method, weights=weights, memory_size=args.memory_size,
                              memory_samples=args.memory_samples)
    args.init = str(init.path) if init is not None else None
    if student_ndim == 3:
        return distill_volume_command(args, teacher, sources, settings, distill)
    if distributed.is_main():
        print(f"distilling {args.init or args.student} from {teacher.path} with {args.method}: {weights.active() or 'no KD terms'}",
              file=sys.stderr)
    bar = TrainingBar("distill")
    as_is = len(args.data) == 1 and "@" not in args.data[0]  # one plain folder: as the bundled student was distilled
    record = distill_student(teacher.path, args.data[0] if as_is else sources, args.out, args.student, settings, distill,
                             unlabelled=unlabelled, n_tune=args.n_tune, command="graphkd " + shlex.join(args.argv),
                             validate_factory=lambda tune: sources_validator(tune if isinstance(tune, dict) else {"tune": tune}),
                             on_progress=bar.update,
                             on_status=lambda m: distributed.is_main() and print(m, file=sys.stderr, flush=True),
                             init_checkpoint=args.init)
    bar.close()
    if distributed.is_main():
        print(f"finished at step {record['step']}; best on tune split: {record['best']}")
    distributed.shutdown()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Tune decoder settings on the checkpoint's tune images and write a small (fp16) copy; or write standard formats."""
    if not (args.out or args.bioimageio or args.onnx):
        raise CLIError("name an output: OUT (checkpoint), --bioimageio OUT.zip and/or --onnx OUT.onnx")
    from .segment import BUNDLED, bundled_path

    source = str(bundled_path(args.checkpoint)) if args.checkpoint in BUNDLED else args.checkpoint
    if args.out:
        write_compact_checkpoint(source, args)
    if args.bioimageio or args.onnx:
        write_standard_formats(args.out or source, args)
    return 0


def write_standard_formats(checkpoint: str, args: argparse.Namespace) -> None:
    """``export --bioimageio`` / ``--onnx``: the checkpoint's network as a bioimage.io package and/or ONNX file."""
    from .io.bioimageio import export_bioimageio, export_onnx
    from .io.checkpoint import load_checkpoint

    if args.onnx:
        export_onnx(load_checkpoint(checkpoint)[0], args.onnx, overwrite=args.overwrite)
        print(f"wrote {args.onnx} ({Path(args.onnx).stat().st_size / 1e6:.2f} MB)")
    if args.bioimageio:
        export_bioimageio(checkpoint, args.bioimageio, name=args.name, overwrite=args.overwrite)
        print(f"wrote {args.bioimageio} ({Path(args.bioimageio).stat().st_size / 1e6:.2f} MB; passes bioimageio.core's model test)")


def write_compact_checkpoint(checkpoint: str, args: argparse.Namespace) -> None:
    """``export CHECKPOINT OUT``: tune the decoder if asked, then write the (fp16) copy."""
    from .data import load_folder
    from .evaluation import DECODE_GRID, network_outputs, score_by_source, score_outputs, tune_decoder
    from .io.checkpoint import load_checkpoint, save_checkpoint
    from .train.segmentation import tune_sets

    model, meta = load_checkpoint(checkpoint)
    tune_names = meta.get("training_data", {}).get("tune_images")
    extra = {}
    if args.tune_data:
        if not tune_names:
            raise CLIError("checkpoint metadata lists no tune images; cannot tune the decoder")
        if len(meta["training_data"].get("sources") or []) > 1:  # several sources: each counts the same
            try:
                sets = tune_sets(meta, data_root=args.tune_data)
            except ValueError as exc:
                raise CLIError(str(exc)) from None
            samples = [s for group in sets.values() for s in group]
            score = score_by_source([len(group) for group in sets.values()])
        else:
            samples, score = load_folder(args.tune_data, names=tune_names), score_outputs
        grid = dict(DECODE_GRID, resolution=(args.resolution,)) if args.resolution else DECODE_GRID
        settings, scores, _ = tune_decoder(network_outputs(model, samples), samples, grid=grid, score=score)
        extra = {"decode": settings.to_dict(), "tune_metrics": scores}
        print(f"decoder tuned on {len(samples)} tune images: {settings} -> f1 {scores['f1@0.5']:.3f} aji {scores['aji']:.3f}")
    if args.name:
        extra["name"] = args.name
    save_checkpoint(args.out, model, dict(meta, **extra), overwrite=args.overwrite, half=args.half)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Segment the bundled samples with the bundled models and the classical pipeline; print metrics."""
    from .metrics import evaluate, mean_metrics
    from .runtime import configure_threads
    from .sample_data import SAMPLE_NAMES, load_sample
    from .segment import BUNDLED, bundled_path, load_segmenter, segment_any

    configure_threads(args.threads)
    models = [m for m in BUNDLED if bundled_path(m).exists()] + ["classical"]
    samples = [load_sample(name) for name in SAMPLE_NAMES]
    print(f"bundled BBBC039 validation samples: {', '.join(SAMPLE_NAMES)} (never used in training)")
    width = max(len(m) for m in models)
    print(f"{'model':<{width}} {'params':>10} {'network ms':>10} {'decode ms':>9} {'F1@0.5':>7} {'AJI':>6} {'PQ':>6} {'SBD':>6}")
    for spec in models:
        segmenter = load_segmenter(spec)
        rows, net, dec = [], 0.0, 0.0
        for image, labels in samples:
            result = segment_any(segmenter, image)
            rows.append(evaluate(labels, result.labels))
            net, dec = net + result.network_seconds, dec + result.decode_seconds
        m, k = mean_metrics(rows), len(samples)
        print(f"{spec:<{width}} {segmenter.parameters:>10,} {1000 * net / k:>10.0f} {1000 * dec / k:>9.0f} "
              f"{m['f1@0.5']:>7.3f} {m['aji']:>6.3f} {m['pq']:>6.3f} {m['sbd']:>6.3f}", flush=True)
    if args.viewer:
        if not display_available():
            print("no display found: skipping the napari viewer (the metrics above are the headless demo)")
            return 0
        import napari

        from ._widgets._demo import open_demo_viewer

        open_demo_viewer()
        napari.run()
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Build (from --from folders/archives, or by downloading) and verify the benchmark data layout."""
    from .io import datasets

    root = Path(args.root)
    names = args.dataset or list(datasets.DATASETS)
    todo = datasets.entries(names)
    if args.verify:
        problems = datasets.verify(root, todo)
        if problems:
            raise CLIError(f"{len(problems)} of {len(todo)} images missing or different under {root}: {', '.join(problems[:5])}"
                           + (" ..." if len(problems) > 5 else ""))
        print(f"{len(todo)} images verified under {root}")
        return 0
    if args.source:
        sources = [Path(s) for s in args.source]
        absent = [s for s in sources if not s.exists()]
        if absent:
            raise CLIError(f"--from path not found: {absent[0]}")
        if any(root.resolve() == s.resolve() or root.resolve() in s.resolve().parents for s in sources):
            raise CLIError("--from must not lie inside the output folder")
    else:
        urls = dict.fromkeys(u for name in names for u in datasets.DOWNLOADS[name])
        sources = datasets.download(urls, root / "downloads")
    index = datasets.index_sources(sources)
    bar = progress(todo, len(todo), "data")
    report = datasets.build(root, index, todo, overwrite=args.overwrite, on_entry=lambda entry: bar.update(1))
    bar.close()
    print(report.summary())
    if report.missing or report.different:
        raise CLIError("the layout is incomplete or differs from the recorded checksums (see above)")
    return 0


def painted_folder(folder: Path, unpainted: str) -> list:
    """FOLDER/images/*.tif with FOLDER/labels/<same name> as annotated images (sorted; the last one is held out)."""
    from .data import read_tiff
    from .train.finetune import AnnotatedImage

    images = sorted(p for p in (folder / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CLIError(f"no TIFF images in {folder / 'images'}")
    out = []
    for path in images:
        labels_path = folder / "labels" / path.name
        if not labels_path.is_file():
            raise CLIError(f"{path.name} has no painted labels at {labels_path}")
        image, labels = read_tiff(path), read_tiff(labels_path)
        checked = np.ones(labels.shape, bool) if unpainted == "background" else None
        out.append(AnnotatedImage(path.name, image, labels, checked))
    return out


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune on a folder of images and painted labels with the Fine-tune widget's library function; write --out."""
    from .runtime import configure_threads
    from .segment import BUNDLED, bundled_path
    from .train.finetune import FinetuneSettings, finetune_report, plan_finetune, run_finetune

    chosen = {"mode": args.mode, "steps": args.steps, "teacher_steps": args.teacher_steps, "margin": args.margin,
              "diameter": args.diameter, "voxel_size": args.voxel_size,
              "invert": None if args.invert == "auto" else args.invert}
    settings = FinetuneSettings(**{k: v for k, v in chosen.items() if v is not None})  # ValueError: one line, exit 2
    out = Path(args.out)
    extra = {"teacher": out.with_name(f"{out.stem}-teacher{out.suffix}")} if settings.mode == "teacher" else {}
    for target in (out, *extra.values()):
        if target.exists():
            raise CLIError(f"{target} exists; choose a new --out (checkpoints are never overwritten)")
    if not out.parent.is_dir():
        raise CLIError(f"the folder of --out ({out.parent}) does not exist")
    configure_threads(args.threads)
    teacher, student = (bundled_path(m) if m in BUNDLED else Path(m) for m in (args.teacher, args.model))
    plan = plan_finetune(painted_folder(Path(args.folder), args.unpainted), settings, teacher, student)

    def on_progress(r: dict) -> None:
        if r["loss"] is None or r["done"] == r["total"] or r["done"] % max(1, r["total"] // 10) == 0:
            loss = "" if r["loss"] is None else f"  loss {r['loss']:.4f}"
            say(f"{r['phase']}: {r['done']}/{r['total']}{loss}", file=sys.stderr)

    result = run_finetune(plan, on_progress=on_progress, targets={"student": out, **extra})
    say(finetune_report(result, plan))
    return 0


def display_available() -> bool:
    """Whether a GUI can open (X11/Wayland on Linux; always on macOS and Windows)."""
    import os

    return not sys.platform.startswith("linux") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def invert_arg(text: str) -> bool | str:
    """``--invert``: ``auto``, ``yes`` or ``no``."""
    choices = {"auto": "auto", "yes": True, "no": False}
    if text.strip().lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, yes or no, got {text!r}")
    return choices[text.strip().lower()]


def crop_arg(text: str) -> tuple[int, int, int]:
    """``--volume-crop Z,Y,X``: three whole numbers >= 4."""
    try:
        values = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three whole numbers Z,Y,X (e.g. 16,64,64)") from None
    if len(values) != 3 or min(values) < 4:
        raise argparse.ArgumentTypeError(f"expected three whole numbers Z,Y,X of at least 4 (e.g. 16,64,64), got {text!r}")
    return values  # type: ignore[return-value]


def add_source_arguments(parser: argparse.ArgumentParser, data_help: str, weights_help: str) -> None:
    """``--data`` sources, their ``--source-weights`` and the ``--out`` run folder of train/distill."""
    parser.add_argument("--data", required=True, action="append", metavar="DIR[@SPLIT]", help=data_help)
    parser.add_argument("--source-weights", type=float, nargs="+", default=None, metavar="W", help=weights_help)
    parser.add_argument("--out", required=True, help="run folder (resumes if it holds a run)")


def add_schedule_arguments(parser: argparse.ArgumentParser, *, steps: int, validate_every: int, acquisition_aug: float,
                           augmented: str) -> None:
    """Schedule, camera augmentation of ``augmented`` (what is re-imaged), validation and threads of train/distill."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--acquisition-aug", type=float, default=acquisition_aug, metavar="P",
                        help=f"chance to re-image {augmented} with a random camera (dim, 8-bit, saturated)")
    parser.add_argument("--n-tune", type=int, default=10, help="images held out to validate on (a source without @SPLIT "
                        "and without a tune/ folder beside DIR=.../train)")
    parser.add_argument("--validate-every", type=int, default=validate_every)
    parser.add_argument("--threads", type=threads_arg, default=0, help="CPU threads (0 = one per idle CPU this process may use)")


def add_volume_training_arguments(parser: argparse.ArgumentParser, voxel: bool) -> None:
    """Options of train/distill that apply to 3D architectures (volume folders)."""
    group = parser.add_argument_group("3D architectures (folders of (Z,Y,X) volumes)")
    group.add_argument("--volume-crop", type=crop_arg, default=(16, 64, 64), metavar="Z,Y,X",
                       help="random training crop of the volumes (default 16,64,64)")
    if voxel:
        group.add_argument("--voxel-size", type=voxel_size_arg, default=None, metavar="Z,Y,X",
                           help="voxel size of the training volumes (any unit; default isotropic): sets the z offsets "
                                "and is stored in the checkpoint, so graphkd segment --voxel-size rescales other volumes to it")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``graphkd``."""
    parser = Parser(prog="graphkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment TIFF images (2D, stacks, time series) into label images")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="TIFF files, folders of TIFFs, or Zarr/OME-Zarr images")
    p.add_argument("--model", default="teacher", help="teacher, student, classical, or a checkpoint path")
    p.add_argument("--out", default=None, help="output folder (OUT/<input stem>.tif; chunked: OUT/<stem>.zarr or "
                   "OUT.zarr; default for OME-Zarr inputs: their labels/ group)")
    p.add_argument("--diameter", type=diameter_arg, default="auto", metavar="auto|PX",
                   help="typical nucleus diameter in px, rescaled to the training size (default auto: measured per image)")
    p.add_argument("--invert", type=invert_arg, nargs="?", const=True, default="auto", metavar="auto|yes|no",
                   help="dark nuclei on a bright background (default auto: detected per image; --invert alone: yes)")
    p.add_argument("--channel", choices=["auto", "luminance", "hematoxylin"], default="auto",
                   help="input channel of RGB images (default auto: hematoxylin for stained histology, else luminance)")
    p.add_argument("--tile", type=int, default=None, help="tile size for large images (px; default 1024; volumes run in "
                   "cubes with as many voxels: 1024 -> 102 per side)")
    p.add_argument("--3d", dest="volume", action="store_true",
                   help="segment (Z,Y,X) images as volumes (needs a 3D model; automatic for 3D checkpoints)")
    p.add_argument("--voxel-size", type=voxel_size_arg, default=None, metavar="Z,Y,X",
                   help="voxel size of the volumes, e.g. 4,1,1 for z steps 4x the pixel size (any unit; default: as the "
                        "3D model was trained); volumes are rescaled to the model's voxel proportions")
    p.add_argument("--threads", type=threads_arg, default=0, help="CPU threads for the network (0 = one per idle CPU this process may use)")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="run the network with torch or onnxruntime (needs the export extra)")
    p.add_argument("--overwrite", action="store_true",
                   help="segment again images whose output exists (default: skip them); inputs are never replaced")
    from .large.command import add_arguments as add_chunked_arguments

    add_chunked_arguments(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("demo", help="segment the bundled samples with the bundled models and print metrics")
    p.add_argument("--threads", type=threads_arg, default=0, help="CPU threads (0 = one per idle CPU this process may use)")
    p.add_argument("--viewer", action="store_true", help="then open napari with the sample, models and widgets")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="metrics of predicted labels against ground truth")
    p.add_argument("--gt", required=True, help="folder of ground-truth label TIFFs")
    p.add_argument("--pred", required=True, help="folder of predicted label TIFFs (same file names)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="model metadata and parameter count")
    p.add_argument("model", help="teacher, student, classical, or a checkpoint path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a network on folders with images/ and labels/ (2D images, or (Z,Y,X) "
                       "volumes for a 3D --arch)")
    add_source_arguments(
        p, "folder with images/*.tif and labels/*.tif; repeat for several sources (batches draw from each "
           "equally). @SPLIT trains on SPLIT_train.txt and tunes on SPLIT_tune.txt: a bundled split "
           "(bbbc039, dsb2018_fluo) or a path prefix of your own lists; DIR may hold all images or train/ and tune/ "
           "sub-folders; without @SPLIT, --n-tune images of DIR are held out",
        "sampling weight of each --data source, in order (default: equal)")
    p.add_argument("--arch", default="resunet-cpu-teacher", help="named architecture (3D: unet3d-teacher, unet3d-student, "
                   "mala3d; their --data folders hold (Z,Y,X) volumes)")
    p.add_argument("--init", default=None, help="start from this checkpoint")
    p.add_argument("--elastic", action="store_true", help="add elastic deformation")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.7, 1.4), metavar=("MIN", "MAX"),
                   help="random zoom around the training nucleus size")
    add_schedule_arguments(p, steps=12000, validate_every=1000, acquisition_aug=0.5, augmented="a crop")
    add_volume_training_arguments(p, voxel=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distil a student from a teacher checkpoint")
    p.add_argument("--teacher", default="teacher", help="teacher checkpoint (default: the bundled teacher)")
    add_source_arguments(
        p, "labelled images as in graphkd train (repeatable). One folder without @SPLIT is used as it is; "
           "several sources or @SPLIT are rescaled to the teacher's training diameter, as graphkd train does",
        "sampling weight of each --data, then each --unlabelled source, in order (default: equal)")
    p.add_argument("--unlabelled", action="append", default=[], metavar="DIR[@SPLIT]",
                   help="images without labels (repeatable): a folder of .tif images (or its images/), or DIR@SPLIT for "
                        "the SPLIT_train images of a labelled folder, labels unused. The teacher segments each once, as "
                        "graphkd segment would (automatic size and polarity); its instances are graph nodes of the "
                        "distillation terms (method pseudo: the segmentation loss's targets)")
    p.add_argument("--student", default="halfres-student", help="named student architecture (a 3D teacher needs a 3D "
                   "student, e.g. unet3d-student, and --data of (Z,Y,X) volumes)")
    p.add_argument("--init", default=None, help="continue this trained student (a checkpoint or a bundled name, e.g. "
                   "student) instead of a new --student network: e.g. with a new teacher or new images")
    p.add_argument("--method", default="grd", help="grd, grd-intra, none, pseudo (the teacher's labels of the "
                   "--unlabelled images as targets, no distillation terms), mimic, at, skd or cwd")
    p.add_argument("--weight", action="append", metavar="TERM=VALUE",
                   help="override a term weight, e.g. --weight inter_edge=0 (repeatable)")
    p.add_argument("--config", default=None, help='JSON file {"weights": {TERM: VALUE}}')
    p.add_argument("--memory-size", type=int, default=32)
    p.add_argument("--memory-samples", type=int, default=12)
    add_schedule_arguments(p, steps=6000, validate_every=500, acquisition_aug=0.0, augmented="the student's crop")
    add_volume_training_arguments(p, voxel=False)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="tune the decoder and write a compact checkpoint; or write bioimage.io / ONNX")
    p.add_argument("checkpoint", help="checkpoint path, or teacher/student (bundled)")
    p.add_argument("out", nargs="?", default=None, help="compact checkpoint to write")
    p.add_argument("--bioimageio", metavar="OUT.zip", default=None,
                   help="also write a BioImage Model Zoo package of the network (tested with bioimageio.core)")
    p.add_argument("--onnx", metavar="OUT.onnx", default=None, help="also write the network as ONNX")
    p.add_argument("--tune-data", default=None, help="folder holding the tune images listed in the checkpoint (e.g. DATA/bbbc039/tune); for a "
                   "checkpoint trained on several sources, the data folder DATA (each source's tune images "
                   "under DATA/NAME/tune)")
    p.add_argument("--half", action="store_true", help="store fp16 weights")
    p.add_argument("--resolution", choices=["full", "half", "quarter"], default=None,
                   help="restrict the decoder search to this decoding grid (default: search full and half)")
    p.add_argument("--name", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune on a folder of images (or volumes) and painted labels (as the Fine-tune widget)")
    p.add_argument("folder", help="folder with images/*.tif and labels/*.tif (same names; label 0 = not painted); "
                   "with several images the last one (by name) is held out for the before/after scores; "
                   "3D models (from their checkpoint) take (Z,Y,X) volumes with (Z,Y,X) labels")
    p.add_argument("--model", default="student", help="model trained and written to --out: student, teacher or a checkpoint path")
    p.add_argument("--teacher", default="teacher", help="teacher it learns from: teacher, student or a checkpoint path")
    p.add_argument("--mode", default=None, help="distil, finetune or teacher, as in the Fine-tune widget "
                   "(default: the widget's default)")
    p.add_argument("--steps", type=int, default=None, help="training steps of the student (default: the widget's default)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="training steps of the teacher in mode teacher (default: the widget's default)")
    p.add_argument("--unpainted", choices=["ignored", "background"], default="ignored",
                   help="unpainted pixels farther than --margin from a painted cell: ignored (partly painted "
                        "images) or background (every nucleus is painted)")
    p.add_argument("--margin", type=int, default=None,
                   help="unpainted pixels within this many px of a painted cell are background (default: the widget's)")
    p.add_argument("--diameter", type=float, default=None, help="nucleus diameter in px (default: measured on the painted "
                   "cells; volumes: run as trained)")
    p.add_argument("--voxel-size", type=voxel_size_arg, default=None, metavar="Z,Y,X",
                   help="3D models: the volumes' voxel size (default: the models' own)")
    p.add_argument("--invert", type=invert_arg, default="auto", metavar="auto|yes|no",
                   help="dark nuclei on a bright background (default auto: detected on the images, as segment does)")
    p.add_argument("--out", required=True, help="new checkpoint (.safetensors; never overwritten); mode teacher also "
                   "writes OUT-teacher.safetensors")
    p.add_argument("--threads", type=threads_arg, default=0, help="CPU threads (0 = one per idle CPU this process may use)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("data", help="build the benchmark data layout (BBBC039, DSB 2018) and verify its checksums")
    p.add_argument("root", help="output folder (give it to the benchmarks as --data)")
    p.add_argument("--from", dest="source", action="append", metavar="PATH",
                   help="folder or .zip with the archives or a laid-out copy (repeatable; default: download)")
    p.add_argument("--dataset", action="append", choices=["bbbc039", "dsb2018_fluo", "dsb2018_brightfield"],
                   help="only this dataset (repeatable; default: all)")
    p.add_argument("--verify", action="store_true", help="only check the files under ROOT against the checksums")
    p.add_argument("--overwrite", action="store_true", help="replace files under ROOT whose content differs")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; expected failures print one line and exit non-zero."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in checkpoints as the command that made them
    from .io.checkpoint import CheckpointError
    from .preprocess import InputError

    try:
        return args.func(args)
    except (CLIError, CheckpointError, InputError, ValueError, FileExistsError, OSError) as exc:
        print(f"graphkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"graphkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
