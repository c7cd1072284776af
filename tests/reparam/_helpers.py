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


class PreActBlock(nn.Module):
    """The common CIFAR pre-activation block (kuangliu/pytorch-cifar ``PreActBlock``): BN -> ReLU -> conv, twice."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """kuangliu/pytorch-cifar ``PreActResNet18`` (widths scaled by ``width / 64``): names pair ``conv1`` with
    ``bn1``, but ``bn1`` normalises the block input and ``conv1`` feeds ``bn2``."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(out.mean((2, 3)))
