"""``convert_model``: swap the ``Conv2d -> BN`` pairs of any model for training-time re-parameterizable blocks.

Each eligible pair (found by :func:`~lightning_nd.reparam.pairs.find_conv_bn_pairs`) becomes an :class:`ACBlock`,
:class:`DiverseBranchBlock` or :class:`RepVGGBlock` with the conv's geometry; the block includes the BN, so the BN's
place takes an ``Identity`` (or timm ``BatchNormAct2d``'s activation). The conv's weights and the BN's parameters and
running statistics are copied into the block's main ``k x k`` branch (a conv bias is absorbed into the BN mean).

With ``preserve=True`` the gammas and betas of the BNs that end the other branches are zeroed, so those branches add
exactly zero in train and eval mode: the converted model computes the same function, and a trained model can be
converted and fine-tuned. With ``preserve=False`` the new branches keep their default initialisation (training from
scratch). After training, :func:`~lightning_nd.reparam.reparameterize_model` folds each block back into one conv of
the original geometry, so the deploy model has the original architecture.

Eligibility: square odd kernels ``k >= 3``, ``padding_mode="zeros"``, symmetric integer padding and stride; ACB
accepts any padding and dilation, DBB needs ``padding == k // 2`` and dilation 1, RepVGG ``padding == dilation * (k//2)``.
Ineligible pairs (``1x1`` convs, ``padding="same"`` with stride, ...) are left as they are.

Example::

    model = timm.create_model("resnet18", num_classes=10)
    convert_model(model, "acb")          # 19 3x3 conv+BN pairs become ACBlocks; 1x1 downsamples stay
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn

from lightning_nd.reparam.acb import ACBlock
from lightning_nd.reparam.dbb import DiverseBranchBlock
from lightning_nd.reparam.pairs import bn_tail, find_conv_bn_pairs
from lightning_nd.reparam.repvgg_block import RepVGGBlock

__all__ = ["BLOCKS", "convert_model", "eligible"]

BLOCKS: dict[str, type[nn.Module]] = {"acb": ACBlock, "dbb": DiverseBranchBlock, "repvgg": RepVGGBlock}


def _square(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return value[0]
    return None


def eligible(conv: nn.Conv2d, block: str) -> dict[str, int] | None:
    """The block geometry for ``conv`` (kernel, stride, padding, dilation, groups), or ``None`` if it cannot become
    a ``block``."""
    k, s, d = _square(conv.kernel_size), _square(conv.stride), _square(conv.dilation)
    p = conv.padding
    if p == "same" and s == 1 and k is not None and d is not None:
        p = d * (k // 2)
    p = _square(p)
    if None in (k, s, p, d) or k < 3 or k % 2 == 0 or conv.padding_mode != "zeros":
        return None
    if block == "dbb" and (d != 1 or p != k // 2):
        return None
    if block == "repvgg" and p != d * (k // 2):
        return None
    geometry = {"kernel_size": k, "stride": s, "padding": p, "groups": conv.groups}
    if block != "dbb":
        geometry["dilation"] = d
    return geometry


@torch.no_grad()
def _load_main(block: nn.Module, conv: nn.Conv2d, bn: nn.Module, preserve: bool) -> None:
    main = block.main_branch()
    main.conv.weight.copy_(conv.weight)
    target = main.bn
    target.eps, target.momentum = bn.eps, bn.momentum
    target.running_mean.copy_(bn.running_mean)
    target.running_var.copy_(bn.running_var)
    target.num_batches_tracked.copy_(bn.num_batches_tracked)
    if conv.bias is not None:  # BN(conv(x) + c) == BN'(conv(x)) with mean' = mean - c
        target.running_mean.sub_(conv.bias)
    if bn.weight is not None:
        target.weight.copy_(bn.weight)
        target.bias.copy_(bn.bias)
    if preserve:
        for norm in block.extra_norms():
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)


def convert_model(
    model: nn.Module,
    block: Literal["acb", "dbb", "repvgg"] = "acb",
    preserve: bool = False,
    **block_kwargs: Any,
) -> nn.Module:
    """Replace every eligible ``Conv2d -> BN`` pair of ``model`` (in place) by a training-time block; returns ``model``.

    Args:
        model: any ``nn.Module``: a timm or torchvision ResNet, a user CNN, a lightning_nd subnet.
        block: ``"acb"`` (ACNet), ``"dbb"`` (Diverse Branch Block) or ``"repvgg"`` (3x3 + 1x1 + identity).
        preserve: keep the model's function (extra branches start at zero); otherwise the extra branches get the
            default initialisation (for training from scratch).
        **block_kwargs: passed to every block (e.g. ``gamma_init=1/3`` for ACB, ``internal_channels`` for DBB).

    Raises:
        ValueError: for an unknown block, an eligible conv whose BN has no running statistics, block arguments the
            block rejects, or when the model has no eligible pair.

    Example::

        net = convert_model(torchvision.models.resnet18(num_classes=10), "dbb")
    """
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} is not supported; allowed: {', '.join(map(repr, BLOCKS))}")
    cls = BLOCKS[block]
    count = 0
    for pair in find_conv_bn_pairs(model):
        conv, bn = pair.conv, pair.bn
        geometry = eligible(conv, block)
        if geometry is None:
            continue
        if bn.running_mean is None:
            raise ValueError(f"{pair.bn_name}: a BN without running statistics cannot become part of a {block} block")
        new = cls(conv.in_channels, conv.out_channels, act_layer=None, **geometry, **block_kwargs)
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        _load_main(new, conv, bn, preserve)
        new.train(conv.training)
        tail = bn_tail(bn)
        tail.train(bn.training)
        setattr(pair.conv_parent, pair.conv_name, new)
        setattr(pair.bn_parent, pair.bn_name, tail)
        count += 1
    if count == 0:
        raise ValueError(
            f"convert_model: no eligible Conv2d -> BatchNorm pair in {type(model).__name__} for block={block!r} "
            "(needs square odd kernels >= 3 followed by a BN, in an nn.Sequential or as convN/bnN siblings)"
        )
    if block == "repvgg" and not any(getattr(m, "identity", None) is not None for m in model.modules()
                                     if isinstance(m, RepVGGBlock)):
        warnings.warn("convert_model: no converted layer keeps in == out with stride 1, so no identity branch was added",
                      UserWarning, stacklevel=2)
    return model
