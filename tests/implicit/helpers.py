"""Small cells shared by the implicit-model tests."""

from __future__ import annotations

import torch
from torch import nn


class ConvCell(nn.Module):
    """z <- tanh(conv(z) + x), scaled so the map is a contraction with a chosen strength."""

    def __init__(self, channels: int = 4, scale: float = 0.5, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, dtype=dtype)
        with torch.no_grad():
            w = torch.randn(self.conv.weight.shape, generator=gen, dtype=dtype)
            # ||conv||_2 <= ||w||_F (a bound), so scale < 1 guarantees a contraction
            self.conv.weight.copy_(scale * w / w.norm())
            self.conv.bias.copy_(0.1 * torch.randn(channels, generator=gen, dtype=dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(z) + x)


class BNCell(nn.Module):
    """z <- tanh(BatchNorm(conv(z)) + x): a cell with BatchNorm inside, which DEQ layers must refuse to sync."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bn(self.conv(z)) + x)


class SlowConvCell(nn.Module):
    """A slowly converging conv cell: z <- tanh(conv(z) + x) with a self-adjoint conv of norm ``radius``."""

    def __init__(self, channels: int = 4, radius: float = 0.9, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=dtype)
        with torch.no_grad():
            w = torch.randn(self.conv.weight.shape, generator=gen, dtype=dtype)
            w = w + w.transpose(0, 1).flip(2, 3)  # a self-adjoint operator: spectral radius = operator norm
            self.conv.weight.copy_(w)
            probe = torch.randn(1, channels, 8, 8, generator=gen, dtype=dtype)
            for _ in range(50):  # power iteration for the conv's operator norm on 8x8 inputs
                probe = torch.nn.functional.conv_transpose2d(self.conv(probe), self.conv.weight, padding=1)
                probe = probe / probe.norm()
            sigma = self.conv(probe).norm()
            self.conv.weight.mul_(radius / sigma)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(z) + x)


class GroupNormConvCell(nn.Module):
    """z <- GN(tanh(conv(z)) + x), GN affine weights in [0.5, 1]: a slowly contracting GroupNorm cell.

    With the defaults of :func:`group_norm_problem` (float64, C=4, 6x6, batch 3) the spectral radii of J_f at z* are
    about 0.8-0.95 (power method), plain iteration reaches a residual of 2e-15 in 4,000 steps, and Broyden with a
    27-factor circular buffer (locuslab/mdeq's wrap) hit the protective break at evaluation 131 with tol 1e-10,
    unconverged (issue 23, point 1).
    """

    def __init__(self, channels: int = 4, groups: int = 2, scale: float = 2.0, seed: int = 2,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=dtype)
        self.gn = nn.GroupNorm(groups, channels, dtype=dtype)
        with torch.no_grad():
            w = torch.randn(self.conv.weight.shape, generator=gen, dtype=dtype)
            self.conv.weight.copy_(scale * w / w.norm())
            self.gn.weight.copy_(0.5 + 0.5 * torch.rand(channels, generator=gen, dtype=dtype))
            self.gn.bias.copy_(0.1 * torch.randn(channels, generator=gen, dtype=dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.gn(torch.tanh(self.conv(z)) + x)


def group_norm_problem(batch: int = 3, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor]:
    """The float64 GroupNorm cell of issue 23 (point 1) and its injection (scale 0.7, seed 3)."""
    cell = GroupNormConvCell(dtype=dtype)
    x = 0.7 * torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(3), dtype=dtype)
    return cell, x


def unrolled(cell: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """n tracked applications from zero: the long-unrolled reference for gradients."""
    z = torch.zeros_like(x)
    for _ in range(n):
        z = cell(z, x)
    return z


def flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).clone() for p in params])


class TinyDEQNet(nn.Module):
    """stem conv -> DEQ(ConvCell) -> mean pool -> linear: a fast network with one equilibrium layer and no BatchNorm."""

    def __init__(self, num_classes: int = 3, channels: int = 4, cell: nn.Module | None = None, **deq_options) -> None:
        super().__init__()
        from lightning_nd.implicit import DEQ

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels, num_classes)
        torch.random.set_rng_state(gen_state)
        self.deq = DEQ(cell if cell is not None else ConvCell(channels, scale=0.6), **deq_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.stem(x)).mean(dim=(2, 3)))


def tiny_loaders(n: int = 32, batch_size: int = 8, seed: int = 0, num_classes: int = 3):
    """Deterministic (unshuffled) train and val loaders of random 1x6x6 images."""
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=False), DataLoader(ds, batch_size=batch_size, shuffle=False)
