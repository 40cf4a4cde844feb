"""Standard model formats: ONNX and BioImage Model Zoo packages (bioimage.io, model RDF 0.5) of a checkpoint's network.

The zoo runs the network only: a 1-channel image in, the pixel embedding and the foreground
probability out, at the input's size. Decoding those outputs into nuclei (affinities + mutex
watershed) is post-processing that napari-graphkd runs; the package's documentation says how.
``bioimageio.spec`` (and ``onnx`` for ONNX weights) come with the ``export`` extra.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..models import EmbeddingUNet
from ..preprocess import PERCENTILES

ONNX_OPSET = 17
INPUT_ID = "image"
EMBEDDING_ID = "embedding"
FOREGROUND_ID = "foreground"
TEST_SAMPLE = "bbbc039_A15_s5"
TEST_CROP = (slice(100, 356), slice(200, 456))  # 256 x 256 px, 25 nuclei; a multiple of every bundled network's size multiple
LICENSE = "BSD-3-Clause"
AUTHORS = ("napari-graphkd developers",)
CITATIONS = (
    ("Liu X, Zhang Y, Xiong Z, Huang W, Hu B, Sun X, Wu F. Graph Relation Distillation for Efficient Biomedical "
     "Instance Segmentation. 2024 (the distillation method).", "https://arxiv.org/abs/2401.06370"),
    ("Caicedo JC, Roth J, Goodman A, Becker T, Karhohs KW, Broisin M, Molnar C, McQuin C, Singh S, Theis FJ, "
     "Carpenter AE. Evaluation of Deep Learning Strategies for Nucleus Segmentation in Fluorescence Images. "
     "Cytometry Part A 95(9), 2019 (BBBC039, the training data).", "https://doi.org/10.1002/cyto.a.23863"),
    ("Caicedo JC, Goodman A, Karhohs KW, et al. Nucleus segmentation across imaging experiments: the 2018 Data "
     "Science Bowl. Nature Methods 16, 2019 (BBBC038 / DSB2018).", "https://doi.org/10.1038/s41592-019-0612-7"),
)


class ExportError(ValueError):
    """A network cannot be written in a standard format (missing optional package, unsupported model)."""


class ZooNetwork(nn.Module):
    """The network as the zoo runs it: a normalised (B,1,H,W) image -> embedding (B,C,H,W) and foreground probability (B,1,H,W).

    H and W must be multiples of the network's size multiple (no padding inside, so the graph is
    shape-generic). The foreground is the sigmoid on the network's own grid, upsampled after, as
    :mod:`napari_graphkd.inference` computes it.
    """

    def __init__(self, model: EmbeddingUNet):
        super().__init__()
        self.model = model
        self.stride = model.config.stem_stride
        self.in_channels = model.config.in_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embedding and (when the network has a foreground head) foreground probability at the input size."""
        if self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        emb, fg, _ = self.model.forward_features(x)
        outputs = [emb] if fg is None else [emb, torch.sigmoid(fg)]
        if self.stride != 1:
            outputs = [F.interpolate(o, scale_factor=float(self.stride), mode="bilinear", align_corners=False) for o in outputs]
        return tuple(o.contiguous() for o in outputs)


class NativeNetwork(nn.Module):
    """The network's own-grid outputs (embedding, foreground logit), as :meth:`EmbeddingUNet.forward_features` gives them to inference."""

    def __init__(self, model: EmbeddingUNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embedding and (when the network has one) foreground logit on the 1/stride grid."""
        emb, fg, _ = self.model.forward_features(x)
        return (emb,) if fg is None else (emb, fg)


def output_ids(model: EmbeddingUNet) -> list[str]:
    """Names of the exported outputs, in order."""
    return [EMBEDDING_ID] + ([FOREGROUND_ID] if model.config.foreground_head else [])


def export_onnx(model: EmbeddingUNet, path: str | Path, *, overwrite: bool = False, native: bool = False) -> Path:
    """Write the network as ONNX (dynamic batch, height and width; sides must be multiples of its size multiple).

    By default the graph is :class:`ZooNetwork` (outputs at the input size, foreground as a probability);
    ``native`` writes :class:`NativeNetwork`, the graph the onnxruntime back-end of inference runs.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (refusing to overwrite)")
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'napari-graphkd[export]'") from None
    net = (NativeNetwork(model) if native else ZooNetwork(model)).eval()
    m = model.size_multiple
    example = torch.zeros(1, model.config.in_channels if native else 1, 4 * m, 4 * m)
    names = output_ids(model)
    dynamic = {INPUT_ID: {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch", 2: "height", 3: "width"} for n in names}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter: exports in 0.3 s where the torch.export-based one takes 17 s; graphs equal to 1e-6
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, (example,), str(tmp), input_names=[INPUT_ID], output_names=names,
                              dynamic_axes=dynamic, opset_version=ONNX_OPSET, dynamo=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_torchscript(model: EmbeddingUNet, path: Path) -> Path:
    """Write the network as a traced TorchScript module (shape-generic: no size-dependent branches in :class:`ZooNetwork`)."""
    net = ZooNetwork(model).eval()
    m = model.size_multiple
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(net, torch.zeros(1, 1, 4 * m, 4 * m))
        traced.save(str(path))
    return path


def sample_input() -> np.ndarray:
    """Raw (1,1,256,256) float32 crop of a bundled sample: the package's test input (normalised by the declared pre-processing)."""
    from ..sample_data import load_sample

    image, _ = load_sample(TEST_SAMPLE)
    return image[TEST_CROP].astype(np.float32)[None, None]


@torch.inference_mode()
def zoo_outputs(model: EmbeddingUNet, raw: np.ndarray) -> list[np.ndarray]:
    """Outputs of :class:`ZooNetwork` on a raw (B,1,H,W) image normalised as the library normalises each image."""
    from ..preprocess import normalize

    x = np.stack([normalize(plane[0])[None] for plane in raw])
    return [o.numpy() for o in ZooNetwork(model).eval()(torch.from_numpy(x))]


def cover_image(raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, 2W, 3) uint8 cover: the normalised image beside its decoded nuclei outlined in colour."""
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    from ..preprocess import normalize

    gray = np.clip(normalize(raw), 0, 1)
    overlay = label2rgb(labels, image=gray, alpha=0.35, bg_label=0)
    overlay[find_boundaries(labels, mode="inner")] = (1.0, 1.0, 0.2)
    return (255 * np.concatenate([np.repeat(gray[..., None], 3, -1), overlay], axis=1)).astype(np.uint8)


def documentation(meta: dict[str, Any], name: str, multiple: int) -> str:
    """Markdown shipped in the package: what the network outputs and how to decode it into nuclei."""
    decode = meta.get("decode")
    decode_line = f"The decoder settings tuned for this network: `{decode}`." if decode else ""
    return f"""# {name}: nucleus embedding network (napari-graphkd)

A U-Net that maps a fluorescence image of nuclei to a {meta.get('embedding_dim', 16)}-channel pixel embedding
(`{EMBEDDING_ID}`) and a foreground probability (`{FOREGROUND_ID}`), both at the input size. Pixels of one nucleus
have similar embeddings; pixels of touching nuclei have dissimilar ones. Architecture: `{meta.get('config')}`.

## Input
One channel, any height and width that are multiples of {multiple} px. The package normalises each image
by mapping its {PERCENTILES[0]} and {PERCENTILES[1]} percentiles to 0 and 1 (`scale_range`). napari-graphkd
additionally caps the stretch for nearly empty, low-contrast fields; the zoo pre-processing does not.
Nuclei should be about {float(meta.get('train_diameter', 28.0)):.0f} px across (BBBC039 scale); rescale other images first.

## Decoding is post-processing
The zoo runs the network only. The instance labels come from a decoder that is **not** part of this
package: cosine affinities of the embedding at short- and long-range offsets, then a mutex watershed
with foreground masking and small-object clean-up. Run the whole pipeline with napari-graphkd:

```
pip install napari-graphkd
graphkd segment --model CHECKPOINT --out labels/ images/
```

where CHECKPOINT is the napari-graphkd checkpoint this package was made from (`{name}`; the bundled
networks are called `teacher` and `student`), or in napari with the napari-graphkd segmentation widget. {decode_line}

## Validation
bioimage.io: the package's test output reproduces from its test input (a crop of a BBBC039 validation
image) with every weight format: napari-graphkd runs `bioimageio.core`'s model test on every package it writes.
Segmentation quality (network + napari-graphkd decoder) on the images held out of training to tune the
decoder: {_metrics_line(meta.get('tune_metrics'))}. The napari-graphkd documentation reports the
BBBC039 validation-split numbers.

## Training data and licence
Trained on BBBC039 (U2OS nuclei, Hoechst; CC0). Weights licence: {LICENSE}. Exported by napari-graphkd
{__version__}.
"""


def _metrics_line(metrics: dict[str, float] | None) -> str:
    """F1@0.5, AJI and PQ of a metrics dict, or a note that the checkpoint stores none."""
    if not metrics:
        return "not recorded in this checkpoint"
    return ", ".join(f"{k.upper()} {metrics[k]:.3f}" for k in ("f1@0.5", "aji", "pq") if k in metrics)


def _tensor_axes(ids: list[str], channel_names: list[str], multiple: int | None, reference: str | None):
    """Axes batch, channel, y, x of an input (sizes a multiple of ``multiple``) or an output (sizes of ``reference``)."""
    from bioimageio.spec.model.v0_5 import (
        AxisId, BatchAxis, ChannelAxis, Identifier, ParameterizedSize, SizeReference, SpaceInputAxis, SpaceOutputAxis, TensorId,
    )

    axes: list[Any] = [BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in channel_names])]
    for axis in ids:
        if reference is None:
            axes.append(SpaceInputAxis(id=AxisId(axis), size=ParameterizedSize(min=multiple, step=multiple)))
        else:
            axes.append(SpaceOutputAxis(id=AxisId(axis), size=SizeReference(tensor_id=TensorId(reference), axis_id=AxisId(axis))))
    return axes


def build_description(checkpoint: str | Path, folder: Path, name: str | None = None, *, onnx: bool = True):
    """``bioimageio.spec`` v0.5 model description of a checkpoint, its files (weights, test tensors, cover, docs) written to ``folder``."""
    try:
        from bioimageio.spec.model.v0_5 import (
            Author, AxisId, CiteEntry, FileDescr, HttpUrl, InputTensorDescr, IntervalOrRatioDataDescr, LicenseId, ModelDescr,
            OnnxWeightsDescr, OutputTensorDescr, ScaleRangeDescr, ScaleRangeKwargs, TensorId, TorchscriptWeightsDescr,
            Version, WeightsDescr,
        )
    except ImportError:
        raise ExportError("bioimage.io export needs bioimageio.spec: pip install 'napari-graphkd[export]'") from None
    import tifffile
    from skimage.io import imsave

    from ..segment import ModelSegmenter, segment_any

    segmenter = ModelSegmenter(checkpoint)
    model, meta = segmenter.model, segmenter.metadata
    name = name or meta.get("name") or Path(checkpoint).stem
    multiple = model.size_multiple
    raw = sample_input()
    if any(s % multiple for s in raw.shape[-2:]):
        raise ExportError(f"the test crop {raw.shape[-2:]} is not a multiple of the network's size multiple {multiple}")
    np.save(folder / "test_input.npy", raw)
    outputs = zoo_outputs(model, raw)
    ids = output_ids(model)
    for tensor_id, out in zip(ids, outputs):
        np.save(folder / f"test_{tensor_id}.npy", out)
    tifffile.imwrite(folder / "sample_input.tif", raw, compression="zlib")
    if FOREGROUND_ID in ids:
        tifffile.imwrite(folder / f"sample_{FOREGROUND_ID}.tif", outputs[ids.index(FOREGROUND_ID)], compression="zlib")

    labels = segment_any(segmenter, raw[0, 0]).labels
    imsave(folder / "cover.png", cover_image(raw[0, 0], labels), check_contrast=False)
    (folder / "README.md").write_text(documentation(meta, name, multiple))

    torch_version = Version(torch.__version__.split("+")[0])
    weights = {"torchscript": TorchscriptWeightsDescr(source=export_torchscript(model, folder / "weights.torchscript.pt"),
                                                      pytorch_version=torch_version)}
    if onnx:
        weights["onnx"] = OnnxWeightsDescr(source=export_onnx(model, folder / "weights.onnx", overwrite=True),
                                           opset_version=ONNX_OPSET, parent="torchscript")
    yx = ["y", "x"]
    normalise = ScaleRangeDescr(kwargs=ScaleRangeKwargs(axes=[AxisId(a) for a in yx], min_percentile=PERCENTILES[0],
                                                         max_percentile=PERCENTILES[1]))
    image = InputTensorDescr(
        id=TensorId(INPUT_ID), description="fluorescence image of nuclei (bright on dark), one channel",
        axes=_tensor_axes(yx, ["intensity"], multiple, None), test_tensor=FileDescr(source=folder / "test_input.npy"),
        sample_tensor=FileDescr(source=folder / "sample_input.tif"),
        data=IntervalOrRatioDataDescr(type="float32"), preprocessing=[normalise],
    )
    described = {
        EMBEDDING_ID: ("pixel embedding; decode with affinities + mutex watershed (see documentation)",
                       [f"e{i}" for i in range(outputs[0].shape[1])]),
        FOREGROUND_ID: ("foreground (nucleus) probability", ["probability"]),
    }
    outs = [OutputTensorDescr(id=TensorId(t), description=described[t][0],
                              axes=_tensor_axes(yx, described[t][1], None, INPUT_ID),
                              test_tensor=FileDescr(source=folder / f"test_{t}.npy"),
                              sample_tensor=FileDescr(source=folder / f"sample_{t}.tif") if t == FOREGROUND_ID else None)
            for t in ids]
    return ModelDescr(
        name=name.replace("_", " "),
        description=f"napari-graphkd {name}: nucleus pixel embedding + foreground network (graph relation distillation); "
                    "instances come from the napari-graphkd decoder",
        authors=[Author(name=a) for a in AUTHORS],
        cite=[CiteEntry(text=text, url=HttpUrl(url)) for text, url in CITATIONS],
        license=LicenseId(LICENSE),
        documentation=FileDescr(source=folder / "README.md"),
        covers=[FileDescr(source=folder / "cover.png")],
        tags=["nuclei", "instance-segmentation", "fluorescence-light-microscopy", "2d", "pytorch", "knowledge-distillation",
              "napari-graphkd"],
        inputs=[image],
        outputs=outs,
        weights=WeightsDescr(**weights),
        version=Version(__version__),
    )


def export_bioimageio(checkpoint: str | Path, out: str | Path, *, name: str | None = None, onnx: bool = True,
                      overwrite: bool = False) -> Path:
    """Write a checkpoint's network as a bioimage.io model package (zip) that passes ``bioimageio.core``'s model test.

    The package is staged next to ``out``, tested, then renamed into place: a failing package is never written.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (refusing to overwrite)")
    if out.suffix.lower() != ".zip":
        raise ExportError(f"a bioimage.io package is a .zip file, got {out.name}")
    try:
        from bioimageio.core import test_model
        from bioimageio.spec import save_bioimageio_package
    except ImportError:
        raise ExportError("bioimage.io export needs bioimageio.core: pip install 'napari-graphkd[export]'") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".zip", dir=out.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory() as folder:
            save_bioimageio_package(build_description(checkpoint, Path(folder), name, onnx=onnx), output_path=Path(staged))
        summary = test_model(staged)
        if summary.status != "passed":
            failed = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
            raise ExportError(f"the package fails bioimageio.core's model test: {failed[0] if failed else summary.status}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # the permissions of a file created the ordinary way, not mkstemp's 0600
        os.replace(staged, out)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return out
