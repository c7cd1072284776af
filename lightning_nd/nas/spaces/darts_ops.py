"""The DARTS operations (Liu et al., ICLR 2019; ``quark0/darts: cnn/operations.py``), written for this project.

Every conv op is ReLU-Conv-BN ordered, convolutions have no bias. ``affine`` switches the BN affine parameters (the
DARTS search network uses ``affine=False`` inside cells, the retrained network and the RLNAS supernet ``True``).
Parameter-free ops carry the attributes the angle code reads (``angle_kind``, ``channels``, ``kernel_size``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

DARTS_OPS = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class ReLUConvBN(nn.Sequential):
    """ReLU, a bias-free convolution, BN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU, a dilated depthwise conv, a pointwise conv, BN (DARTS ``dil_conv_kxk``)."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, dilation: int, affine: bool = True
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked DilConv-like blocks without dilation (DARTS ``sep_conv_kxk``: the first one strided)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, 1, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class Identity(nn.Identity):
    """``skip_connect`` at stride 1; ``channels`` sizes RLNAS's ``eye(C)`` pseudo-weight."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels


class Zero(nn.Module):
    """``none``: zeros of the output shape (strided like the other ops of its edge)."""

    angle_kind = "none"

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset 1x1 stride-2 convs whose outputs are concatenated, then BN."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class PoolBN(nn.Sequential):
    """A 3x3 pooling followed by BN: the search network's pooling op (DARTS ``MixedOp``, RLNAS supernet)."""

    angle_kind = "pool"
    kernel_size = 3

    def __init__(self, kind: str, channels: int, stride: int, affine: bool) -> None:
        super().__init__(pool(kind, stride), nn.BatchNorm2d(channels, affine=affine))
        self.channels = channels


def pool(kind: str, stride: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda c, stride, affine: Zero(stride),
    "max_pool_3x3": lambda c, stride, affine: pool("max", stride),
    "avg_pool_3x3": lambda c, stride, affine: pool("avg", stride),
    "skip_connect": lambda c, stride, affine: Identity(c) if stride == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "sep_conv_7x7": lambda c, stride, affine: SepConv(c, c, 7, stride, 3, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
}


def search_op(name: str, channels: int, stride: int, affine: bool) -> nn.Module:
    """An op of the search network: as :data:`OPS`, but pooling is followed by BN (DARTS ``MixedOp``).

    Raises:
        ValueError: for an unknown op name.
    """
    if name not in OPS:
        raise ValueError(f"unknown DARTS op {name!r}; allowed: {sorted(OPS)}")
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        return PoolBN(name[:3], channels, stride, affine)
    return OPS[name](channels, stride, affine)
