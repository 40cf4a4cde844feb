"""Standard formats: the exported network equals the library's, ONNX runs in onnxruntime, the bioimage.io package validates."""
import os
import stat
import zipfile

import numpy as np
import pytest
import torch
import yaml

from napari_graphkd.cli import main
from napari_graphkd.decode.policy import decode_output
from napari_graphkd.inference import network_output, working_image
from napari_graphkd.io.bioimageio import ZooNetwork, export_onnx, sample_input, zoo_outputs
from napari_graphkd.io.checkpoint import load_checkpoint
from napari_graphkd.preprocess import normalize


def test_zoo_network_outputs_are_the_library_network_outputs(tiny_checkpoint, crop):
    """What the zoo runs (embedding + foreground probability at input size) equals the library's network output."""
    model, _ = load_checkpoint(tiny_checkpoint)
    image = crop[0][:128, :192]
    library = network_output(model, working_image(image))
    embedding, foreground = zoo_outputs(model, image[None, None].astype(np.float32))
    np.testing.assert_allclose(embedding[0], library.full_embedding(), atol=1e-5)
    np.testing.assert_allclose(foreground[0, 0], library.full_foreground(), atol=1e-6)


def test_onnx_export_runs_in_onnxruntime_like_torch_at_another_size(tiny_checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, _ = load_checkpoint(tiny_checkpoint)
    path = export_onnx(model, tmp_path / "net.onnx")
    x = normalize(sample_input()[0, 0, :96, :160])[None, None]  # not the export's example size: dynamic axes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})
    with torch.no_grad():
        want = ZooNetwork(model).eval()(torch.from_numpy(x))
    assert [o.name for o in session.get_outputs()] == ["embedding", "foreground"]
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape) and g.shape[-2:] == (96, 160)
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4)
    with pytest.raises(FileExistsError):
        export_onnx(model, path)


def test_bioimageio_package_of_the_bundled_student_passes_the_core_model_test(tmp_path, capsys):
    """``graphkd export student --bioimageio`` writes a package; bioimageio.core's model test passes offline."""
    core = pytest.importorskip("bioimageio.core")
    out = tmp_path / "student.zip"
    assert main(["export", "student", "--bioimageio", str(out)]) == 0
    assert "passes bioimageio.core's model test" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # permissions like any file the user writes
    summary = core.test_model(out)  # tested again from the file, as a zoo user would
    assert summary.status == "passed", summary.format()
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        docs = z.read("README.md").decode()
    assert {"weights.torchscript.pt", "weights.onnx", "test_input.npy", "test_embedding.npy", "test_foreground.npy",
            "cover.png", "README.md"} <= names
    assert rdf["format_version"].startswith("0.5") and set(rdf["weights"]) == {"torchscript", "onnx"}
    assert [o["id"] for o in rdf["outputs"]] == ["embedding", "foreground"]
    assert rdf["inputs"][0]["preprocessing"][1]["kwargs"]["max_percentile"] == 99.8
    cited = " ".join(c["text"] for c in rdf["cite"])
    assert "Graph Relation Distillation" in cited and "BBBC039" in cited and "Data Science Bowl" in cited
    assert "post-processing" in docs and "graphkd segment" in docs
    assert main(["export", "student", "--bioimageio", str(out)]) == 2  # never overwrites


@pytest.mark.parametrize("args, message", [
    (["student"], "name an output"),
    (["student", "--bioimageio", "student.onnx"], "is a .zip file"),
])
def test_export_needs_an_output_of_the_right_kind(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", *args]) == 2
    assert message in capsys.readouterr().err


def test_onnxruntime_network_gives_the_library_the_torch_output(tiny_checkpoint, crop):
    """OnnxNetwork stands in for the torch network in inference: same native-grid output, same labels."""
    pytest.importorskip("onnxruntime")
    from napari_graphkd.models.onnx import OnnxNetwork

    model, _ = load_checkpoint(tiny_checkpoint)
    working = working_image(crop[0])
    by_torch = network_output(model, working, tile=128)
    by_onnx = network_output(OnnxNetwork(model, threads=1), working, tile=128)
    np.testing.assert_allclose(by_onnx.embedding, by_torch.embedding, atol=1e-5)
    np.testing.assert_allclose(by_onnx.foreground, by_torch.foreground, atol=1e-6)
    assert np.array_equal(decode_output(by_onnx)[0], decode_output(by_torch)[0])


def test_segment_with_the_onnx_runtime_writes_the_torch_labels(crop, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", crop[0])
    for runtime in ("torch", "onnx"):
        args = ["segment", "--model", "student", "--runtime", runtime, "--threads", "1", "--out",
                str(tmp_path / runtime), str(tmp_path / "a.tif")]
        assert main(args) == 0
    by_onnx, by_torch = tifffile.imread(tmp_path / "onnx" / "a.tif"), tifffile.imread(tmp_path / "torch" / "a.tif")
    assert by_torch.max() > 5 and np.array_equal(by_onnx, by_torch)
    assert main(["segment", "--model", "classical", "--runtime", "onnx", "--out", str(tmp_path / "c"), str(tmp_path / "a.tif")]) == 2
    assert "the classical pipeline has none" in capsys.readouterr().err


def test_the_onnx_runtime_is_refused_on_the_chunked_path(tmp_path, capsys):
    assert main(["segment", "--chunked", "--runtime", "onnx", "--out", str(tmp_path / "o"), str(tmp_path / "x.zarr")]) == 2
    assert "--runtime onnx runs whole images only" in capsys.readouterr().err
