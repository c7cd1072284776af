"""Shared test helpers: randomised BatchNorm statistics (defaults would hide bias and padding bugs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running mean in U(-.5, .5), var in U(.3, 2), gamma in U(.3, 1.5), beta in U(-.5, .5) for every BN; the
    learned part of identity-based 1x1 convs gets small random values too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.7 + 0.3)
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=g) * 1.2 + 0.3)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
        if hasattr(m, "id_tensor") and isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max()).item()
