"""Building blocks shared by the embedding networks, in 2D or 3D (``ndim``)."""
from __future__ import annotations

import torch
from torch import nn


def conv(ndim: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d`` for images or volumes."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[ndim]


def batch_norm(ndim: int) -> type[nn.Module]:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d`` for images or volumes."""
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]


class ResidualBlock(nn.Module):
    """Residual block of the published ResUNet: two 3x3 conv+BN with a 3x3 conv+BN projection shortcut (3x3x3 in 3D)."""

    def __init__(self, in_channels: int, out_channels: int, projection_kernel: int = 3, ndim: int = 2):
        super().__init__()
        pad = projection_kernel // 2
        conv_nd, bn_nd = conv(ndim), batch_norm(ndim)
        self.body = nn.Sequential(
            conv_nd(in_channels, out_channels, 3, padding=1),
            bn_nd(out_channels),
            nn.ReLU(inplace=True),
            conv_nd(out_channels, out_channels, 3, padding=1),
            bn_nd(out_channels),
        )
        self.shortcut = nn.Sequential(
            conv_nd(in_channels, out_channels, projection_kernel, padding=pad),
            bn_nd(out_channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SeparableBlock(nn.Module):
    """Depthwise-separable residual block (MobileNet style): cheap convs for mobile students."""

    def __init__(self, in_channels: int, out_channels: int, ndim: int = 2):
        super().__init__()
        conv_nd, bn_nd = conv(ndim), batch_norm(ndim)
        self.body = nn.Sequential(
            conv_nd(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            bn_nd(in_channels),
            nn.ReLU(inplace=True),
            conv_nd(in_channels, out_channels, 1, bias=False),
            bn_nd(out_channels),
            nn.ReLU(inplace=True),
            conv_nd(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False),
            bn_nd(out_channels),
        )
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(conv_nd(in_channels, out_channels, 1, bias=False), bn_nd(out_channels))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))
