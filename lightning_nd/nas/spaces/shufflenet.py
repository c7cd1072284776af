"""The SPOS ShuffleNetV2 block space (``megvii-model/SinglePathOneShot: src/Supernet``).

20 choice blocks (stage repeats 4, 4, 8, 4), each one of ``shufflenet_3x3``, ``shufflenet_5x5``,
``shufflenet_7x7`` (ShuffleNetV2 units with a k x k depthwise conv) or ``xception`` (three 3x3 depthwise convs):
4^20 ≈ 1.1e12 paths. The first block of a stage has stride 2 and a projection branch; the others split the
channels with SPOS's channel shuffle and run half of them through the block. **Every BatchNorm is
``affine=False``** as in the official supernet. Stem: 3x3 conv stride 2; head: 1x1 conv to 1024, global pooling,
dropout 0.1, linear classifier without bias. Widths and repeats are arguments so a CPU test can use a tiny copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_nd.nas.choice import Choice

SHUFFLENET_OPS = ["shufflenet_3x3", "shufflenet_5x5", "shufflenet_7x7", "xception"]


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, affine=False)


def _dw(c: int, k: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False), _bn(c)]


def _pw(c_in: int, c_out: int, relu: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 1, bias=False), _bn(c_out)] + ([nn.ReLU(inplace=True)] if relu else [])


def channel_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPOS's split: interleaved halves of the channels."""
    b, c, h, w = x.shape
    x = x.reshape(b * c // 2, 2, h * w).permute(1, 0, 2).reshape(2, -1, c // 2, h, w)
    return x[0], x[1]


class ShuffleBlock(nn.Module):
    """A ShuffleNetV2 unit (``ksize`` in 3/5/7) or, with ``xception=True``, SPOS's Shuffle-Xception unit."""

    def __init__(self, inp: int, oup: int, mid: int, ksize: int, stride: int, xception: bool = False) -> None:
        super().__init__()
        self.stride = stride
        out = oup - inp
        if xception:
            main = _dw(inp, 3, stride) + _pw(inp, mid) + _dw(mid, 3, 1) + _pw(mid, mid) + _dw(mid, 3, 1) + _pw(mid, out)
        else:
            main = _pw(inp, mid) + _dw(mid, ksize, stride) + _pw(mid, out)
        self.branch_main = nn.Sequential(*main)
        self.branch_proj = nn.Sequential(*(_dw(inp, ksize, stride) + _pw(inp, inp))) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_proj is None:
            proj, x = channel_shuffle(x)
            return torch.cat((proj, self.branch_main(x)), 1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)


class ShuffleNetSupernet(nn.Module):
    """The SPOS ShuffleNetV2 supernet (block search).

    Args:
        num_classes: classifier outputs (1000 for ImageNet).
        in_chans: input channels.
        input_size: input side (224 for ImageNet); small sizes work (global pooling).
        stage_repeats: blocks per stage (official ``(4, 4, 8, 4)`` = 20 choice blocks).
        stage_out_channels: stem, stage and last-conv widths (official ``(16, 64, 160, 320, 640, 1024)``);
            stage widths must be divisible by 4.
        dropout: dropout before the classifier (0.1).

    Raises:
        ValueError: for mismatched repeats/widths or widths not divisible by 4.

    Example::

        net = build_space("shufflenet", num_classes=10, input_size=32)
        set_arch(net, [2, 1, 0, 1, 2, 0, 2, 0, 2, 0, 2, 3, 0, 0, 0, 0, 3, 2, 3, 3])
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        input_size: int = 224,
        stage_repeats: Sequence[int] = (4, 4, 8, 4),
        stage_out_channels: Sequence[int] = (16, 64, 160, 320, 640, 1024),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        widths = list(stage_out_channels)
        if len(widths) != len(stage_repeats) + 2:
            raise ValueError(
                f"stage_out_channels={widths} needs len(stage_repeats) + 2 = {len(stage_repeats) + 2} entries "
                "(stem, one per stage, last conv)"
            )
        if any(w % 4 for w in widths[1:-1]) or any(r < 1 for r in stage_repeats):
            raise ValueError(f"stage widths {widths[1:-1]} must be divisible by 4 and repeats {stage_repeats} >= 1")
        self.input_size = input_size
        c = widths[0]
        self.first_conv = nn.Sequential(nn.Conv2d(in_chans, c, 3, 2, 1, bias=False), _bn(c), nn.ReLU(inplace=True))
        blocks, index = [], 0
        for repeats, oup in zip(stage_repeats, widths[1:-1]):
            for i in range(repeats):
                inp, stride = (c, 2) if i == 0 else (c // 2, 1)
                mid = oup // 2
                ops = {
                    f"shufflenet_{k}x{k}": ShuffleBlock(inp, oup, mid, k, stride) for k in (3, 5, 7)
                } | {"xception": ShuffleBlock(inp, oup, mid, 3, stride, xception=True)}
                blocks.append(Choice(ops, key=f"block{index}"))
                index += 1
                c = oup
        self.features = nn.Sequential(*blocks)
        self.conv_last = nn.Sequential(*_pw(c, widths[-1]))
        self.globalpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_last(self.features(self.first_conv(x)))
        return self.classifier(self.dropout(self.globalpool(x).flatten(1)))
