"""Finding ``Conv2d -> BatchNorm`` pairs in an arbitrary model, without running it.

Two patterns cover timm, torchvision and most hand-written CNNs:

* inside an ``nn.Sequential``, a ``Conv2d`` immediately followed by a ``_BatchNorm`` (torchvision's
  ``Conv2dNormActivation``, ResNet ``downsample``, plain VGG stacks);
* sibling attributes whose names pair ``bn``/``norm`` with ``conv``: ``bn`` + ``conv`` (timm's ``ConvNormAct``),
  ``bn1`` + ``conv1`` (ResNet blocks and stems), ``norm2`` + ``conv2``.

In both patterns the "conv" may also be an ``nn.Sequential`` (nested any depth) whose last module is the ``Conv2d``:
timm's deep stems (``resnet10t``, ``resnet*d``) keep ``conv1 = Sequential(conv, bn, act, conv, bn, act, conv)`` next to
the root's ``bn1``. A pair is accepted only when the channel counts agree. The caller replaces the conv by a module that
includes the BN and the BN by :func:`bn_tail` (the activation and dropout that timm's ``BatchNormAct2d`` applies after
normalising).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class ConvBNPair:
    """A conv followed by a BN, each addressed by its parent module and attribute name.

    The two parents differ when the conv is the last module of a nested ``nn.Sequential`` (a deep stem).

    Raises:
        AttributeError: from :attr:`conv` / :attr:`bn` when the model was changed so the names no longer resolve.

    Example::

        for pair in find_conv_bn_pairs(model):
            print(type(pair.conv).__name__, pair.conv.out_channels, pair.bn.num_features)
    """

    conv_parent: nn.Module  # the module holding the conv
    conv_name: str  # attribute name of the conv in ``conv_parent``
    bn_parent: nn.Module  # the module holding the BN
    bn_name: str  # attribute name of the BN in ``bn_parent``

    @property
    def conv(self) -> nn.Conv2d:
        return getattr(self.conv_parent, self.conv_name)

    @property
    def bn(self) -> _BatchNorm:
        return getattr(self.bn_parent, self.bn_name)


def _conv_names(bn_name: str) -> list[str]:
    names = []
    for tag in ("bn", "norm"):
        if tag in bn_name:
            names.append(bn_name.replace(tag, "conv", 1))
    return names


def _trailing_conv(parent: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent, name)`` of the module that runs last in ``parent.<name>``: descends into trailing Sequentials."""
    module = getattr(parent, name)
    while isinstance(module, nn.Sequential) and len(module) > 0:
        parent = module
        name, module = list(parent.named_children())[-1]
    return parent, name


def find_conv_bn_pairs(model: nn.Module) -> list[ConvBNPair]:
    """All ``Conv2d -> _BatchNorm`` pairs found by the patterns above, each conv and BN at most once, in module order.

    Example::

        pairs = find_conv_bn_pairs(torchvision.models.resnet18())   # 20: the 7x7 stem, 16 3x3, 3 downsample 1x1
    """
    pairs: list[ConvBNPair] = []
    seen: set[int] = set()

    def add(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv_parent, conv_name = _trailing_conv(parent, conv_name)
        conv, bn = getattr(conv_parent, conv_name), getattr(parent, bn_name)
        if id(bn) in seen or id(conv) in seen:
            return
        if type(conv) is not nn.Conv2d or not isinstance(bn, _BatchNorm) or conv.out_channels != bn.num_features:
            return
        seen.update((id(bn), id(conv)))
        pairs.append(ConvBNPair(conv_parent, conv_name, parent, bn_name))

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
