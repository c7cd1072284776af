"""MDEQ: the multiscale deep equilibrium classifier (Bai, Koltun, Kolter, NeurIPS 2020; locuslab/deq MDEQ-Vision).

The equilibrium state is a list of feature maps at several resolutions, ``z = [z_1 (C_1, H, W), z_2 (C_2, H/2, W/2),
...]``, all driven to a joint fixed point by one :class:`MDEQCell`:

1. every resolution runs a residual block (conv3x3 C -> eC, GroupNorm, ReLU, conv3x3 eC -> C, variational dropout,
   + input injection, GroupNorm, + residual, ReLU, GroupNorm); only the highest resolution gets the injection;
2. multiscale fusion: branch i sums every branch j, upsampled (1x1 conv + GroupNorm + nearest) or downsampled
   (strided 3x3 convs with GroupNorm, ReLU between);
3. post-fusion ReLU -> 1x1 conv -> GroupNorm(groups // 2).

GroupNorm everywhere inside the cell (BatchNorm statistics would change between solver iterations); BatchNorm only
in the stem and the head. Weight norm on the block convolutions and the post-fusion convolutions, computed once per
forward by the :class:`~lightning_nd.implicit.DEQ`. The classification head is the HRNet-style one of MDEQ-Vision:
a bottleneck per resolution, strided convs that merge them from high to low resolution, a 1x1 conv to
``final_channels``, global average pooling and a linear layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nd.implicit.deq import DEQ, DEQConfig
from lightning_nd.implicit.norm import VariationalDropout, apply_weight_norm


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def _gn(groups: int, channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, affine=affine)


class MDEQBlock(nn.Module):
    """The residual block of one resolution (MDEQ-Vision ``BasicBlock``).

    ``conv3x3 (C -> eC) -> GN -> ReLU -> conv3x3 (eC -> C) -> variational dropout -> + injection -> GN -> + z ->
    ReLU -> GN``.

    Args:
        channels: channels C of the resolution.
        expansion: width factor e of the inner convolution.
        groups: GroupNorm groups (capped at the channel count).
        dropout: variational dropout probability.
        weight_norm: weight-normalise both convolutions.

    Raises:
        ValueError: for a dropout outside [0, 1) or groups that do not divide the channels (from GroupNorm).

    Example::

        block = MDEQBlock(24, expansion=5, groups=8, dropout=0.0, weight_norm=True)
        z_next = block(z, injection=x)   # z, x: (B, 24, H, W)
    """

    def __init__(self, channels: int, expansion: int, groups: int, dropout: float, weight_norm: bool) -> None:
        super().__init__()
        inner = channels * expansion
        self.conv1 = _conv3x3(channels, inner)
        self.gn1 = _gn(groups, inner)
        self.conv2 = _conv3x3(inner, channels)
        self.drop = VariationalDropout(dropout)
        self.gn2 = _gn(groups, channels)
        self.gn3 = _gn(groups, channels)
        if weight_norm:
            apply_weight_norm(self.conv1)
            apply_weight_norm(self.conv2)

    def forward(self, z: torch.Tensor, injection: torch.Tensor | None = None) -> torch.Tensor:
        # in place where autograd allows it (conv, GroupNorm and add do not save their outputs, ReLU saves its own):
        # a solver calls the cell many times per step, and on CPU every fresh activation costs page faults
        out = F.relu(self.gn1(self.conv1(z)), inplace=True)
        out = self.drop(self.conv2(out))
        if injection is not None:
            out += injection
        out = self.gn2(out)
        out += z
        return self.gn3(F.relu(out, inplace=True))


class MDEQCell(nn.Module):
    """The multiscale equilibrium map ``f(z, x)``: per-resolution residual blocks, fusion, post-fusion 1x1 convs.

    Args:
        channels: channels per resolution, highest resolution first (each next one is half the size).
        expansion: width factor of the blocks' inner convolution (5 in MDEQ).
        groups: GroupNorm groups (8 in all MDEQ-Vision configs).
        dropout: variational dropout probability (one mask per DEQ forward).
        weight_norm: weight-normalise the block and post-fusion convolutions.
        post_gn_affine: learnable affine of the post-fusion GroupNorm (False in the CIFAR configs).

    Raises:
        ValueError: for no branches, non-positive channels or expansion.

    Example::

        cell = MDEQCell([24, 24])
        z = cell([torch.zeros(2, 24, 32, 32), torch.zeros(2, 24, 16, 16)], x)   # x: (2, 24, 32, 32)
    """

    def __init__(
        self,
        channels: list[int] | tuple[int, ...] = (24, 24),
        expansion: int = 5,
        groups: int = 8,
        dropout: float = 0.0,
        weight_norm: bool = True,
        post_gn_affine: bool = False,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels={channels} must be a non-empty list of positive integers")
        if expansion < 1:
            raise ValueError(f"expansion={expansion} must be >= 1")
        self.channels = channels
        n = len(channels)
        self.blocks = nn.ModuleList(MDEQBlock(c, expansion, groups, dropout, weight_norm) for c in channels)
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution -> upsample
                    row.append(nn.Sequential(nn.Conv2d(channels[j], channels[i], 1, bias=False), _gn(groups, channels[i])))
                else:  # higher resolution -> (i - j) strided convs
                    steps: list[nn.Module] = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = channels[i] if last else channels[j]
                        steps += [_conv3x3(channels[j], cout, stride=2), _gn(groups, cout)]
                        if not last:
                            steps.append(nn.ReLU())
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)
        self.post = nn.ModuleList()
        for c in channels:
            conv = nn.Conv2d(c, c, 1, bias=False)
            if weight_norm:
                apply_weight_norm(conv)
            # in-place ReLU: its input is the fusion sum, a fresh tensor nothing else reads
            self.post.append(nn.Sequential(nn.ReLU(inplace=True), conv, _gn(max(groups // 2, 1), c, affine=post_gn_affine)))

    def state_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """Per-resolution state shape ``(C, H, W)`` for an injection of spatial size ``height x width``."""
        shapes = []
        for i, c in enumerate(self.channels):
            h, w = height, width
            for _ in range(i):
                h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((c, h, w))
        return shapes

    def forward(self, z: list[torch.Tensor] | tuple[torch.Tensor, ...], x: torch.Tensor) -> list[torch.Tensor]:
        blocks = [blk(zi, x if i == 0 else None) for i, (blk, zi) in enumerate(zip(self.blocks, z))]
        out = []
        for i, row in enumerate(self.fuse):
            y = blocks[i]
            for j, op in enumerate(row):
                if j == i:
                    continue
                t = op(blocks[j])
                if j > i:
                    t = F.interpolate(t, size=blocks[i].shape[-2:], mode="nearest")
                y = y + t
            out.append(self.post[i](y))
        return out


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (expansion 4) with BatchNorm and a projected shortcut (head only)."""

    expansion = 4

    def __init__(self, cin: int, planes: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            _conv3x3(planes, planes),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class MDEQ(nn.Module):
    """Multiscale DEQ classifier: stem -> DEQ(MDEQCell) -> multiscale classification head.

    Args:
        num_classes: output classes.
        in_chans: input image channels.
        channels: channels per resolution of the equilibrium state (highest first); ``channels[0]`` is also the stem's.
        head_channels: per-resolution bottleneck widths of the head (output 4x each).
        final_channels: channels before global pooling.
        expansion, groups, dropout, weight_norm, post_gn_affine: see :class:`MDEQCell`.
        downsample: stride-2 stem convolutions (0 for CIFAR/Fashion-MNIST, 2 for ImageNet).
        deq: :class:`~lightning_nd.implicit.DEQConfig` or a dict of its fields (solvers, tolerances, backward mode).
        reuse_fixed_point: start the solver from the previous call's equilibrium when the injection (stem output)
            is the same tensor value as last time (repeated evaluation of one batch: metrics, attacks, spectral
            estimates); the solve then typically stops after one evaluation. Off by default: it keeps the last
            state in memory and costs a comparison per call.

    Attributes:
        deq: the :class:`~lightning_nd.implicit.DEQ` (``model.deq.last_stats`` after each call).

    Raises:
        ValueError: for mismatched ``channels``/``head_channels`` lengths, bad sizes or unknown DEQ options.

    Example::

        net = MDEQ(num_classes=10, in_chans=1, channels=[8, 16], head_channels=[4, 8], final_channels=64,
                   deq={"f_solver": "anderson", "f_max_iter": 12})
        logits = net(torch.randn(2, 1, 28, 28))
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        channels: list[int] | tuple[int, ...] = (24, 24),
        head_channels: list[int] | tuple[int, ...] = (8, 16),
        final_channels: int = 200,
        expansion: int = 5,
        groups: int = 8,
        dropout: float = 0.25,
        weight_norm: bool = True,
        post_gn_affine: bool = False,
        downsample: int = 0,
        deq: DEQConfig | dict[str, Any] | None = None,
        reuse_fixed_point: bool = False,
    ) -> None:
        super().__init__()
        channels, head_channels = list(channels), list(head_channels)
        if len(head_channels) != len(channels):
            raise ValueError(f"head_channels={head_channels} needs one entry per resolution in channels={channels}")
        if num_classes < 1 or in_chans < 1 or final_channels < 1:
            raise ValueError(f"num_classes={num_classes}, in_chans={in_chans}, final_channels={final_channels} must be >= 1")
        if downsample not in (0, 1, 2):
            raise ValueError(f"downsample={downsample} must be 0, 1 or 2")
        c0 = channels[0]
        self.stem = nn.Sequential(
            _conv3x3(in_chans, c0, stride=2 if downsample >= 1 else 1),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
            _conv3x3(c0, c0, stride=2 if downsample >= 2 else 1),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
        )
        self.deq = DEQ(MDEQCell(channels, expansion, groups, dropout, weight_norm, post_gn_affine), deq)
        self.incre = nn.ModuleList(_Bottleneck(c, h) for c, h in zip(channels, head_channels))
        self.down = nn.ModuleList(
            nn.Sequential(
                _conv3x3(head_channels[i] * 4, head_channels[i + 1] * 4, stride=2, bias=True),
                nn.BatchNorm2d(head_channels[i + 1] * 4),
                nn.ReLU(inplace=True),
            )
            for i in range(len(channels) - 1)
        )
        self.final = nn.Sequential(
            nn.Conv2d(head_channels[-1] * 4, final_channels, 1),
            nn.BatchNorm2d(final_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(final_channels, num_classes)
        self.reuse_fixed_point = reuse_fixed_point
        self._last: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # (injection, equilibrium) of the last call

    @property
    def cell(self) -> MDEQCell:
        """The equilibrium map (owned by ``self.deq``)."""
        return self.deq.cell

    def initial_state(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Zeros for every resolution, given the injection ``x`` (the stem output)."""
        b, _, h, w = x.shape
        return [x.new_zeros(b, *s) for s in self.cell.state_shapes(h, w)]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The equilibrium state (one map per resolution) for a batch of images."""
        x = self.stem(images)
        z0 = self.initial_state(x)
        if self.reuse_fixed_point and self._last is not None:
            last_x, last_z = self._last
            if last_x.shape == x.shape and last_x.dtype == x.dtype and torch.equal(last_x, x.detach()):
                z0 = [z.clone() for z in last_z]
        zs = self.deq(x, z0)
        if self.reuse_fixed_point:
            self._last = (x.detach(), [z.detach() for z in zs])
        return zs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        zs = self.features(images)
        y = self.incre[0](zs[0])
        for i, down in enumerate(self.down):
            y = self.incre[i + 1](zs[i + 1]) + down(y)
        y = self.final(y)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))
