"""RepVGG models (Ding et al., CVPR 2021): a plain stack of RepVGG blocks, A0-A2 and B0-B3, registered in timm.

Five stages: a stem block (stride 2, ``min(64, 64a)`` channels) and four stages of ``(2, 4, 14, 1)`` (A) or
``(4, 6, 16, 1)`` (B) blocks of widths ``(64a, 128a, 256a, 512b)``, each starting with stride 2; global average
pooling and a linear classifier. After :func:`~lightning_nd.reparam.reparameterize_model` it is a VGG-style stack of
3x3 convs and ReLUs.

The module layout and state-dict keys equal timm's ``byobnet`` RepVGG (``stem``, ``stages.i.j``, ``head.fc``), so
weights move between ``timm.create_model("repvgg_a0")`` and ``lnd_repvgg_a0`` with a strict ``load_state_dict``.
Our timm names carry the ``lnd_`` prefix so they never clash with timm's own ``repvgg_*``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_nd.reparam.repvgg_block import RepVGGBlock

__all__ = ["RepVGG", "repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b2", "repvgg_b3"]

# name: (blocks per stage, width multipliers (a, b))
_SPECS: dict[str, tuple[tuple[int, int, int, int], tuple[float, float]]] = {
    "a0": ((2, 4, 14, 1), (0.75, 2.5)),
    "a1": ((2, 4, 14, 1), (1.0, 2.5)),
    "a2": ((2, 4, 14, 1), (1.5, 2.75)),
    "b0": ((4, 6, 16, 1), (1.0, 2.5)),
    "b1": ((4, 6, 16, 1), (2.0, 4.0)),
    "b2": ((4, 6, 16, 1), (2.5, 5.0)),
    "b3": ((4, 6, 16, 1), (3.0, 5.0)),
}


class ClassifierHead(nn.Module):
    """Global average pooling, dropout and a linear layer (keys ``fc.*``, as timm's ``ClassifierHead``).

    Args:
        in_features: channels of the feature map.
        num_classes: outputs; 0 gives pooled features (``fc`` is an ``Identity``).
        drop_rate: dropout probability before ``fc``.

    Raises:
        ValueError: from ``nn.Dropout`` for a ``drop_rate`` outside [0, 1].

    Example::

        head = ClassifierHead(1280, 10)      # (N, 1280, H, W) -> (N, 10)
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(x).flatten(1)))


class RepVGG(nn.Module):
    """A RepVGG network: a stem block, four stages of :class:`RepVGGBlock`, pooling and a classifier.

    Args:
        num_blocks: blocks in each of the four stages.
        width_multipliers: ``(a, b)``: stage widths ``64a, 128a, 256a, 512b``; stem ``min(64, 64a)``.
        num_classes: classifier outputs (0 for features only).
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        deploy: build every block in its fused form (to load a deploy state dict).

    Raises:
        ValueError: for a number of stages other than four, non-positive widths or an invalid ``in_chans``.

    Example::

        model = RepVGG((2, 4, 14, 1), (0.75, 2.5), num_classes=10)
        deploy = reparameterize_model(model.eval())
    """

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 4, 14, 1),
        width_multipliers: tuple[float, float] = (0.75, 2.5),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or any(n < 1 for n in num_blocks):
            raise ValueError(f"num_blocks={num_blocks} must be four positive stage depths")
        a, b = width_multipliers
        if a <= 0 or b <= 0:
            raise ValueError(f"width_multipliers={width_multipliers} must be positive")
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans} must be >= 1")
        widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        stem = min(64, int(64 * a))
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.stem = RepVGGBlock(in_chans, stem, 3, stride=2, deploy=deploy)
        stages, chs = [], stem
        for depth, width in zip(num_blocks, widths):
            blocks = []
            for i in range(depth):
                blocks.append(RepVGGBlock(chs, width, 3, stride=2 if i == 0 else 1, deploy=deploy))
                chs = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(chs, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _factory(variant: str) -> Any:
    depths, widths = _SPECS[variant]

    def build(pretrained: bool = False, **kwargs: Any) -> RepVGG:
        if pretrained:
            raise ValueError(f"lnd_repvgg_{variant}: no pretrained weights are published for lightning_nd models")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
            kwargs.pop(key, None)
        return RepVGG(depths, widths, **kwargs)

    build.__name__ = f"repvgg_{variant}"
    build.__qualname__ = build.__name__
    build.__doc__ = f"RepVGG-{variant.upper()} (blocks {depths}, widths {widths}); ``deploy=True`` builds it fused."
    return build


repvgg_a0 = _factory("a0")
repvgg_a1 = _factory("a1")
repvgg_a2 = _factory("a2")
repvgg_b0 = _factory("b0")
repvgg_b1 = _factory("b1")
repvgg_b2 = _factory("b2")
repvgg_b3 = _factory("b3")


def register_timm_models() -> list[str]:
    """Register ``lnd_repvgg_{a0,...,b3}`` in timm's registry (idempotent); returns the names."""
    import timm
    from timm.models import register_model

    names = []
    for variant in _SPECS:
        name = f"lnd_repvgg_{variant}"
        names.append(name)
        if timm.is_model(name):
            continue
        fn = _factory(variant)
        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = __name__
        register_model(fn)
    return names
