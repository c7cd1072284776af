"""The NAS-Bench-201 cell space as a supernet (the official ``TinyNetwork`` macro skeleton).

A cell has 4 nodes; node j sums one op applied to each earlier node i (6 edges, in the official order
``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``), each edge choosing among ``NB201_OPS``. One architecture is shared by all
``3 N`` cells (the edges are ``Choice`` layers keyed by the edge name), so the space has 5^6 = 15,625 paths.
Macro skeleton: a 3x3 conv stem with BN, N cells at C channels, a ResNet reduction block, N cells at 2C, another
reduction block, N cells at 4C, BN + ReLU, global average pooling and a linear classifier. Ops are ReLU-Conv-BN
without conv bias; ``avg_pool_3x3`` is ``AvgPool2d(3, 1, 1, count_include_pad=False)``; ``none`` outputs zeros.

With the defaults (C=16, N=5) the exported subnet of a cell string has exactly the benchmark's parameter count
(``0.073306 M + 0.24304 M n3 + 0.028 M n1`` for 10 classes, ``nas.md`` §6).

The space exposes :meth:`NB201Supernet.angle_multiplicity` for the angle statistics: in ABS/RLNAS's angle of a
NB201 path, every cell contributes the weights of each of its 4 input->output paths (an edge's weights appear
once per surviving path through it), and a path that contains ``none`` is dropped.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from lightning_nd.nas.choice import Choice

NB201_OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
NB201_EDGES = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]  # (to, from), official order
# The 4 input->output paths of a cell, as edge indices into NB201_EDGES: 0->3, 0->1->3, 0->2->3, 0->1->2->3.
NB201_CELL_PATHS = [[3], [0, 4], [1, 5], [0, 2, 5]]


def arch_to_str(arch: list[int]) -> str:
    """The official string of an architecture, e.g. ``|nor_conv_3x3~0|+|none~0|skip_connect~1|+|...|``.

    Raises:
        ValueError: for an architecture that is not 6 indices into ``NB201_OPS``.
    """
    arch = [int(a) for a in arch]
    if len(arch) != 6 or not all(0 <= a < len(NB201_OPS) for a in arch):
        raise ValueError(f"a NB201 architecture is 6 indices in 0..4, got {arch}")
    nodes, k = [], 0
    for j in range(1, 4):
        nodes.append("|" + "|".join(f"{NB201_OPS[arch[k + i]]}~{i}" for i in range(j)) + "|")
        k += j
    return "+".join(nodes)


def str_to_arch(text: str) -> list[int]:
    """Parse an official NB201 string into 6 op indices (edge order ``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``).

    Raises:
        ValueError: for a malformed string or an unknown op.
    """
    nodes = text.strip().split("+")
    if len(nodes) != 3:
        raise ValueError(f"not a NB201 cell string (needs 3 nodes joined by '+'): {text!r}")
    arch = []
    for j, node in enumerate(nodes, start=1):
        items = [t for t in node.strip().strip("|").split("|") if t]
        if len(items) != j:
            raise ValueError(f"node {j} of {text!r} needs {j} inputs, got {items}")
        for i, item in enumerate(items):
            match = re.fullmatch(r"(\w+)~(\d+)", item)
            if not match or int(match.group(2)) != i:
                raise ValueError(f"bad edge {item!r} in {text!r}: expected '<op>~{i}'")
            if match.group(1) not in NB201_OPS:
                raise ValueError(f"unknown op {match.group(1)!r} in {text!r}; allowed: {NB201_OPS}")
            arch.append(NB201_OPS.index(match.group(1)))
    return arch


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv (no bias) -> BN, the NB201 conv op."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class Zero(nn.Module):
    """The ``none`` op: zeros shaped like the input, outside the autograd graph."""

    angle_kind = "none"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape)


class Skip(nn.Identity):
    """The ``skip_connect`` op (identity)."""

    angle_kind = "identity"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels


class AvgPool(nn.AvgPool2d):
    """The ``avg_pool_3x3`` op; for the angle it counts as a constant 1/9 kernel per channel."""

    angle_kind = "pool"

    def __init__(self, channels: int) -> None:
        super().__init__(3, stride=1, padding=1, count_include_pad=False)
        self.channels = channels


def nb201_op(name: str, channels: int, affine: bool = True) -> nn.Module:
    return {
        "none": lambda: Zero(channels),
        "skip_connect": lambda: Skip(channels),
        "nor_conv_1x1": lambda: ReLUConvBN(channels, channels, 1, affine=affine),
        "nor_conv_3x3": lambda: ReLUConvBN(channels, channels, 3, affine=affine),
        "avg_pool_3x3": lambda: AvgPool(channels),
    }[name]()


class NB201Cell(nn.Module):
    """A searchable NB201 cell: 6 ``Choice`` edges keyed ``"1<-0" ... "3<-2"`` (shared by all cells)."""

    def __init__(self, channels: int, affine: bool = True) -> None:
        super().__init__()
        self.edges = nn.ModuleDict(
            {
                f"{j}<-{i}": Choice({op: nb201_op(op, channels, affine) for op in NB201_OPS}, key=f"{j}<-{i}")
                for j, i in NB201_EDGES
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for j in range(1, 4):
            nodes.append(sum(self.edges[f"{j}<-{i}"](nodes[i]) for i in range(j)))
        return nodes[3]


class ResNetBasicBlock(nn.Module):
    """The fixed NB201 reduction block: two ReLU-Conv-BN 3x3 (stride 2, then 1) + avg-pool/1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NB201Supernet(nn.Module):
    """The NAS-Bench-201 supernet.

    Args:
        num_classes: classifier outputs (10 for CIFAR-10).
        in_chans: input channels (3; 1 for gray images).
        input_size: input side; any size >= 4 works (the network ends with global pooling); kept for the
            FLOPs/shape checks of the modules that build the space.
        C: channels of the first stage (16 in the benchmark).
        N: cells per stage (5 in the benchmark).
        affine: BN affine parameters in the cell ops. ``True`` (default) gives the benchmark's standalone networks
            and parameter counts; ``False`` is the official one-shot supernet (ABS/RLNAS ``affine=False`` inside
            cells, so their NB201 angle counts only the conv weights of cell ops).

    Raises:
        ValueError: for non-positive ``C``/``N``/``num_classes`` or an input size below 4.

    Example::

        net = NB201Supernet(num_classes=10)
        set_arch(net, str_to_arch("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"))
        logits = net(torch.randn(2, 3, 32, 32))
    """

    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, input_size: int = 32, C: int = 16, N: int = 5, affine: bool = True
    ) -> None:
        super().__init__()
        if C < 1 or N < 1 or num_classes < 1 or in_chans < 1:
            raise ValueError(f"C={C}, N={N}, num_classes={num_classes}, in_chans={in_chans} must all be >= 1")
        if input_size < 4:
            raise ValueError(f"input_size={input_size} is too small for two reductions; allowed: >= 4")
        self.input_size = input_size
        self.stem = nn.Sequential(nn.Conv2d(in_chans, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        cells: list[nn.Module] = []
        channels = C
        for stage, width in enumerate((C, 2 * C, 4 * C)):
            if stage > 0:
                cells.append(ResNetBasicBlock(channels, width))
                channels = width
            cells.extend(NB201Cell(width, affine) for _ in range(N))
        self.cells = nn.ModuleList(cells)
        self.lastact = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        x = self.global_pooling(self.lastact(x)).flatten(1)
        return self.classifier(x)

    @staticmethod
    def angle_multiplicity(archs: np.ndarray) -> np.ndarray:
        """How often each edge's op weights appear in the angle vector of each path (ABS/RLNAS convention).

        ``archs`` is an ``(n, 6)`` array; the result is ``(n, 6)``: for each edge, the number of the cell's 4
        input->output paths that run through it and contain no ``none``. A row of zeros means every path is
        dropped (a disconnected cell): its angle is defined as 0.
        """
        archs = np.asarray(archs, dtype=np.int64).reshape(-1, 6)
        mult = np.zeros(archs.shape, dtype=np.float64)
        none = NB201_OPS.index("none")
        for path in NB201_CELL_PATHS:
            alive = np.all(archs[:, path] != none, axis=1).astype(np.float64)
            for e in path:
                mult[:, e] += alive
        return mult
