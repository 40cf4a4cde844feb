"""Embedding networks and their named configurations."""
from __future__ import annotations

from .unet import EMBEDDING_DIM, EmbeddingUNet, UNetConfig, count_parameters

NAMED_CONFIGS: dict[str, UNetConfig] = {
    # docs/method.md, "Architectures": the paper's teacher and student widths (3-channel input as in the paper).
    "resunet-paper-teacher": UNetConfig(widths=(32, 64, 179, 349, 680), in_channels=3, foreground_head=False),
    "resunet-paper-tiny": UNetConfig(widths=(4, 8, 16, 32, 64), in_channels=3, foreground_head=False),
    # The bundled CPU-trainable teacher (docs/method.md, "Architectures").
    "resunet-cpu-teacher": UNetConfig(widths=(16, 32, 64, 128, 256)),
    # Half-resolution students (docs/method.md, "Architectures"): stride-2 stem, no full-resolution block.
    "halfres-student": UNetConfig(widths=(8, 12, 16), stem_stride=2),
    "mobile-student": UNetConfig(widths=(12, 24, 32, 48), stem_stride=2, block="separable"),
    # Volumes (docs/method.md, "Volumes"). The paper's MALA widths (12, x5 per level) with its anisotropic
    # pooling (coarse z first): ~122 M parameters with our residual blocks, a reference, not CPU-trainable.
    "mala3d": UNetConfig(widths=(12, 60, 300, 1500), ndim=3, pool=((1, 3, 3), (1, 3, 3), (3, 3, 3))),
    # The CPU-sized 3D teacher (2.19 M parameters) and its half-resolution separable student (13.8 k, 0.63 %).
    "unet3d-teacher": UNetConfig(widths=(16, 32, 64, 128), ndim=3),
    "unet3d-student": UNetConfig(widths=(12, 24, 32), stem_stride=2, block="separable", ndim=3),
}


def build_model(config: UNetConfig | str) -> EmbeddingUNet:
    """Network from a config or a named config (see ``NAMED_CONFIGS``)."""
    if isinstance(config, str):
        if config not in NAMED_CONFIGS:
            raise ValueError(f"unknown architecture {config!r}; known: {', '.join(NAMED_CONFIGS)}")
        config = NAMED_CONFIGS[config]
    return EmbeddingUNet(config)


__all__ = ["EMBEDDING_DIM", "EmbeddingUNet", "UNetConfig", "NAMED_CONFIGS", "build_model", "count_parameters"]
