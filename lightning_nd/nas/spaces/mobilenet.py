"""The ABS / RLNAS MobileNet (ProxylessNAS-like) space (``megvii-model/AngleNAS``, ``megvii-model/RLNAS`` configs).

21 choice layers after a 3x3 stem (3 -> 40, stride 2) and a fixed expand-ratio-1 MBConv (40 -> 24). Each layer
picks an MBConv with kernel 3/5/7 and expand ratio 3/6 (6 ops) or, except in layer 0 and the first layer of each
later stage (the layers that change width or stride: 0, 4, 8, 12, 16, 20), an ``identity`` (7 ops):
6^6 · 7^15 ≈ 2.2e17 paths. Widths (ImageNet): 32 x4, 56 x4, 112 x4, 128 x4, 256 x4, 432 x1; a 1x1 conv to 1728,
global pooling and the classifier. An MBConv is ``[1x1 conv, BN, ReLU6, kxk depthwise, BN, ReLU6, 1x1 conv, BN]``
(the three convs are ABS's ``conv[0]``, ``conv[3]``, ``conv[6]``), with a residual when shapes allow. As in the
official supernets, activations are ReLU6 and every conv is initialised ``normal(0, sqrt(2 / (k² · C_out)))`` with
BN weight 1 and bias 0: the initial scales enter the angle's cosine directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lightning_nd.nas.choice import Choice

MOBILENET_OPS = [f"mobilenet_{k}x{k}_ratio_{e}" for k in (3, 5, 7) for e in (3, 6)] + ["identity"]
# (out channels, stride) of the 21 choice layers (RLNAS mobilenet config.backbone_info).
MOBILENET_LAYERS = (
    [(32, 2)] + [(32, 1)] * 3 + [(56, 2)] + [(56, 1)] * 3 + [(112, 2)] + [(112, 1)] * 3
    + [(128, 1)] + [(128, 1)] * 3 + [(256, 2)] + [(256, 1)] * 3 + [(432, 1)]
)


class MBConv(nn.Sequential):
    """Inverted residual: expand 1x1, depthwise kxk, project 1x1; residual when ``stride == 1 and inp == oup``."""

    def __init__(self, inp: int, oup: int, kernel: int, expand: int, stride: int) -> None:
        mid = inp * expand
        super().__init__(
            nn.Conv2d(inp, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(mid, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )
        self.residual = stride == 1 and inp == oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return x + y if self.residual else y


class Identity(nn.Identity):
    """The ``identity`` op (layer skipped); for the angle: nothing (ABS) or ``eye(channels)`` (RLNAS)."""

    angle_kind = "identity"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels


class MobileNetSupernet(nn.Module):
    """The ABS/RLNAS MobileNet supernet.

    Args:
        num_classes: classifier outputs.
        in_chans: input channels.
        input_size: input side (224 for ImageNet; small sizes work thanks to global pooling).
        width_mult: multiplies every width (rounded to a multiple of 8, at least 8) for small CPU runs.
        layers: ``(out_channels, stride)`` of each choice layer (default: the 21 official layers); layers whose
            stride is 1 and whose width equals the previous width may be identity.
        stem_channels, first_channels, last_channels: stem, fixed first MBConv and final 1x1 conv widths.

    Raises:
        ValueError: for ``width_mult <= 0`` or an empty layer list.

    Example::

        net = build_space("mobilenet", num_classes=10, input_size=32, width_mult=0.25)
        set_arch(net, PathSampler(net).sample(0))
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        input_size: int = 224,
        width_mult: float = 1.0,
        layers: Sequence[Sequence[int]] | None = None,
        stem_channels: int = 40,
        first_channels: int = 24,
        last_channels: int = 1728,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult={width_mult} must be > 0")
        layers = [tuple(int(v) for v in layer) for layer in (layers or MOBILENET_LAYERS)]
        if not layers:
            raise ValueError("layers is empty: the space needs at least one choice layer")

        def w(c: int) -> int:
            return max(8, int(round(c * width_mult / 8)) * 8)

        self.input_size = input_size
        stem, first = w(stem_channels), w(first_channels)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)
        )
        self.first = nn.Sequential(
            nn.Conv2d(stem, stem, 3, 1, 1, groups=stem, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True),
            nn.Conv2d(stem, first, 1, bias=False),
            nn.BatchNorm2d(first),
        )
        blocks, c, raw = [], first, first_channels
        for i, (raw_out, stride) in enumerate(layers):
            out = w(raw_out)
            ops: dict[str, nn.Module] = {
                f"mobilenet_{k}x{k}_ratio_{e}": MBConv(c, out, k, e, stride) for k in (3, 5, 7) for e in (3, 6)
            }
            if stride == 1 and raw == raw_out:  # the official structure decides, whatever the width multiplier
                ops["identity"] = Identity(c)
            blocks.append(Choice(ops, key=f"layer{i}"))
            c, raw = out, raw_out
        self.features = nn.Sequential(*blocks)
        last = w(last_channels)
        self.conv_last = nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.globalpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():  # the official initialisation (see the module doc)
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_last(self.features(self.first(self.stem(x))))
        return self.classifier(self.globalpool(x).flatten(1))
