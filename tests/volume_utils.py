"""A tiny fake 3D network and synthetic volumes for tests of the volume path (no trained 3D model needed)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

OFFSETS_3D = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -4, 0), (0, 0, -4))


@dataclass(frozen=True)
class FakeConfig:
    """The config fields the pipeline reads of a 3D network."""

    ndim: int = 3
    stem_stride: int = 1
    in_channels: int = 1
    embedding_dim: int = 16

    def stem_strides(self) -> tuple[int, ...]:
        """Stride of the stem per axis."""
        return (self.stem_stride,) * self.ndim


class FakeNet3d(nn.Module):
    """A 3x3x3 mean filter: foreground = bright voxels, embedding = (intensity, 1 - intensity, 0, ...).

    Its receptive field is one voxel, so overlapping tiles give exactly the whole-volume output; it
    pads z to a multiple of 2 and y, x to multiples of 4, like an anisotropic U-Net.
    """

    def __init__(self):
        super().__init__()
        self.config = FakeConfig()
        self.size_multiples = (2, 4, 4)
        self.size_multiple = 4
        self.calls = 0
        self.conv = nn.Conv3d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)

    def forward_features(self, x: torch.Tensor):
        """Embedding (B,16,D,H,W), foreground logit (B,1,D,H,W), no decoder features."""
        assert all(n % m == 0 for n, m in zip(x.shape[2:], self.size_multiples))
        self.calls += 1
        smooth = self.conv(x)
        emb = torch.cat([smooth, 1 - smooth, torch.zeros_like(smooth).repeat(1, 14, 1, 1, 1)], dim=1)
        return emb, 12 * (smooth - 0.5), []


def blob_volume(shape=(12, 40, 48), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 volume, int32 labels): three bright separated ellipsoids on a dark noisy background (bright objects, not to be inverted)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    volume = 20 + rng.normal(0, 3, shape)
    centres = [(shape[0] // 2, 10, 12), (shape[0] // 2, 28, 14), (shape[0] // 3, 20, 36)]
    for i, (z, y, x) in enumerate(centres, 1):
        r2 = ((zz - z) / 4.0) ** 2 + ((yy - y) / 6.0) ** 2 + ((xx - x) / 6.0) ** 2
        labels[r2 <= 1] = i
        volume += np.where(r2 <= 1, 100 + 120 * (1 - r2), 0)  # brightest at the centre, like stained nuclei
    return np.clip(volume, 0, 255).astype(np.uint8), labels


def volume_checkpoint(path, voxel_size=(2.0, 1.0, 1.0)):
    """A small random 3D U-Net (anisotropic pooling) saved as a checkpoint trained, it says, at ``voxel_size``."""
    from napari_graphkd.affinity import offsets_for
    from napari_graphkd.io.checkpoint import save_checkpoint
    from napari_graphkd.models import UNetConfig, build_model

    torch.manual_seed(0)
    model = build_model(UNetConfig(widths=(4, 8), ndim=3, pool=((1, 2, 2),)))
    offsets = [list(o) for o in offsets_for(3, voxel_size[0] / voxel_size[2])]
    return save_checkpoint(path, model, {"name": "tiny3d", "voxel_size": list(voxel_size), "offsets": offsets})

