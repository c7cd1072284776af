"""Finding ``Conv2d -> BatchNorm`` pairs in an arbitrary model, without running it.

Two patterns cover timm, torchvision and most hand-written CNNs:

* inside an ``nn.Sequential``, a ``Conv2d`` immediately followed by a ``_BatchNorm`` (torchvision's
  ``Conv2dNormActivation``, ResNet ``downsample``, plain VGG stacks);
* sibling attributes whose names pair ``bn``/``norm`` with ``conv``: ``bn`` + ``conv`` (timm's ``ConvNormAct``),
  ``bn1`` + ``conv1`` (ResNet blocks and stems), ``norm2`` + ``conv2``.

A pair is accepted only when the channel counts agree. The caller replaces the conv by a module that includes the BN
and the BN by :func:`bn_tail` (the activation and dropout that timm's ``BatchNormAct2d`` applies after normalising).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class ConvBNPair:
    """A conv followed by a BN, addressed by their parent and attribute names."""

    parent: nn.Module  # the module holding both
    conv_name: str  # attribute name of the conv in ``parent``
    bn_name: str  # attribute name of the BN in ``parent``

    @property
    def conv(self) -> nn.Conv2d:
        return getattr(self.parent, self.conv_name)

    @property
    def bn(self) -> _BatchNorm:
        return getattr(self.parent, self.bn_name)


def _conv_names(bn_name: str) -> list[str]:
    names = []
    for tag in ("bn", "norm"):
        if tag in bn_name:
            names.append(bn_name.replace(tag, "conv", 1))
    return names


def find_conv_bn_pairs(model: nn.Module) -> list[ConvBNPair]:
    """All ``Conv2d -> _BatchNorm`` pairs found by the two patterns above, each BN at most once, in module order."""
    pairs: list[ConvBNPair] = []
    seen: set[int] = set()

    def add(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if id(bn) in seen or id(conv) in seen:
            return
        if type(conv) is not nn.Conv2d or not isinstance(bn, _BatchNorm) or conv.out_channels != bn.num_features:
            return
        seen.update((id(bn), id(conv)))
        pairs.append(ConvBNPair(parent, conv_name, bn_name))

    for parent in model.modules():
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (conv_name, _), (bn_name, _) in zip(children, children[1:]):
                add(parent, conv_name, bn_name)
            continue
        names = dict(children)
        for bn_name, bn in children:
            if isinstance(bn, _BatchNorm):
                for conv_name in _conv_names(bn_name):
                    if conv_name in names:
                        add(parent, conv_name, bn_name)
    return pairs


def bn_tail(bn: nn.Module) -> nn.Module:
    """What stays in the BN's place once it is folded: ``Identity``, or timm ``BatchNormAct2d``'s dropout + act."""
    parts = [getattr(bn, name) for name in ("drop", "act") if isinstance(getattr(bn, name, None), nn.Module)]
    parts = [p for p in parts if not isinstance(p, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)
