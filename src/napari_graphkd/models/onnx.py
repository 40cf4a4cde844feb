"""A checkpoint's network run by onnxruntime instead of torch, behind the interface inference uses."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .unet import EmbeddingUNet


class OnnxNetwork:
    """``forward_features`` of an :class:`EmbeddingUNet` computed by an onnxruntime CPU session of its exported graph.

    Inference only calls ``config``, ``size_multiple``, ``forward_features`` and ``parameters``, so this
    object replaces the torch network there unchanged. The session uses ``threads`` CPU threads
    (0: as many as torch is set to use).
    """

    def __init__(self, model: EmbeddingUNet, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the onnx runtime needs onnxruntime: pip install 'napari-graphkd[export]'") from None
        from ..io.bioimageio import export_onnx

        self.torch_model = model
        self.config = model.config
        self.size_multiple = model.size_multiple
        with tempfile.TemporaryDirectory() as folder:
            graph = export_onnx(model, Path(folder) / "network.onnx", native=True).read_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Embedding and foreground logit on the network's grid (no decoder features: inference needs none)."""
        outputs = self.session.run(None, {"image": x.detach().numpy()})
        fg = torch.from_numpy(outputs[1]) if len(outputs) > 1 else None
        return torch.from_numpy(outputs[0]), fg, []

    def parameters(self):
        """The torch network's parameters (for counting)."""
        return self.torch_model.parameters()
