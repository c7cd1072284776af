"""``convert_model``: swap the ``Conv2d -> BN`` pairs of any model for training-time re-parameterizable blocks.

Each eligible pair becomes an :class:`ACBlock`,
:class:`DiverseBranchBlock` or :class:`RepVGGBlock` with the conv's geometry; the block includes the BN, so the BN's
place takes an ``Identity`` (or timm ``BatchNormAct2d``'s activation). The conv's weights and the BN's parameters and
running statistics are copied into the block's main ``k x k`` branch (a conv bias is absorbed into the BN mean).

With ``preserve=True`` the gammas and betas of the BNs that end the other branches are zeroed, so those branches add
exactly zero in train and eval mode: the converted model computes the same function, and a trained model can be
converted and fine-tuned. With ``preserve=False`` the new branches keep their default initialisation (training from
scratch). After training, :func:`~lightning_nd.reparam.reparameterize_model` folds each block back into one conv of
the original geometry, so the deploy model has the original layers (keys differ: ``conv1.reparam_conv.weight``).

Pairs come from the dataflow (:func:`~lightning_nd.reparam.pairs.find_conv_bn_pairs`: a ``torch.fx`` trace, or one
hooked forward on ``example_input``): a BN is taken only when its sole input is the conv's output and nothing else
reads that output, so pre-activation layouts (PreAct-ResNet, timm ResNetV2, DenseNet, DPN) keep their function. Pairs
inside a module that re-parameterizes itself (timm's RepVGG/MobileOne/FastViT blocks, our blocks) are left to that
module's own ``reparameterize()``/``fuse()``, which reads those children by name.

Tied tensors (a conv weight shared with another conv or a ``ConvTranspose2d``, an aliased module) stay tied: the
block's main branch reuses the very same ``Parameter`` instead of a copy (``Conversion.tied`` lists them). A tied conv
*bias* would have to be absorbed into the block's BN mean, which unties it: such a pair is left as it is, with a
warning and the reason in the report.

Eligibility: square odd kernels ``k >= 3``, ``padding_mode="zeros"``, symmetric integer padding and stride; ACB
accepts any padding and dilation, DBB needs ``padding == k // 2`` and dilation 1, RepVGG ``padding == dilation * (k//2)``.
Ineligible pairs (``1x1`` convs, ``padding="same"`` with stride, ...) are left as they are.

Example::

    model = timm.create_model("resnet18", num_classes=10)
    convert_model(model, "acb")          # the 7x7 stem and 16 3x3 conv+BN pairs become ACBlocks; 1x1 downsamples stay
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_nd.reparam.acb import ACBlock
from lightning_nd.reparam.dbb import DiverseBranchBlock
from lightning_nd.reparam.fusion import memory_format_of
from lightning_nd.reparam.pairs import SkippedBN, bn_tail, find_conv_bn_pairs, parameter_users
from lightning_nd.reparam.protocol import METHODS, protocol_method
from lightning_nd.reparam.repvgg_block import RepVGGBlock

__all__ = [
    "BLOCKS",
    "Conversion",
    "convert_model",
    "convert_model_with_report",
    "eligible",
    "self_reparameterizing",
]

log = logging.getLogger(__name__)

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
    if type(conv) is not nn.Conv2d:  # Conv2dSame pads at run time, MixedConv2d is several convs: fold-only pairs
        return None
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


def _shared(users: dict[int, list], module: nn.Module, tensor: torch.Tensor | None) -> list[str]:
    """Paths of the *other* modules that hold ``tensor`` as a parameter (tied weights)."""
    if tensor is None:
        return []
    return sorted({path for owner, path in users.get(id(tensor), []) if owner is not module})


@torch.no_grad()
def _load_main(block: nn.Module, conv: nn.Conv2d, bn: nn.Module, preserve: bool, users: dict[int, list]) -> list[str]:
    """Load the conv+BN into the block's main branch; a tensor tied to other modules is *reused*, not copied, so the
    tie holds in training too. Returns the tied tensors kept."""
    main = block.main_branch()
    kept = []
    if _shared(users, conv, conv.weight):
        main.conv.weight = conv.weight
        kept.append("conv.weight")
    else:
        main.conv.weight.copy_(conv.weight)
    target = main.bn
    target.eps, target.momentum = bn.eps, bn.momentum
    target.running_mean.copy_(bn.running_mean)
    target.running_var.copy_(bn.running_var)
    target.num_batches_tracked.copy_(bn.num_batches_tracked)
    if conv.bias is not None:  # BN(conv(x) + c) == BN'(conv(x)) with mean' = mean - c
        target.running_mean.sub_(conv.bias)
    for name in ("weight", "bias"):
        tensor = getattr(bn, name)
        if tensor is not None and _shared(users, bn, tensor):
            setattr(target, name, tensor)
            kept.append(f"bn.{name}")
        elif tensor is not None:
            getattr(target, name).copy_(tensor)
    if preserve:
        for norm in block.extra_norms():
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)
    return kept


def _untieable(users: dict[int, list], conv: nn.Conv2d, bn: nn.Module) -> str | None:
    """Why converting this pair would untie something silently, or ``None``."""
    if conv.bias is not None and _shared(users, conv, conv.bias):
        return (f"the conv bias is tied to {', '.join(_shared(users, conv, conv.bias))}: it would be absorbed into "
                "the block's BN mean, untying it")
    return None


@dataclass
class Conversion:
    """What :func:`convert_model_with_report` did."""

    block: str  # the block type the pairs became
    converted: list[str] = field(default_factory=list)  # dotted paths of the convs that became blocks
    ineligible: list[str] = field(default_factory=list)  # verified pairs whose conv geometry the block cannot take
    skipped: list[SkippedBN] = field(default_factory=list)  # BNs not paired, with the reason
    method: str = "fx"  # how the dataflow was read: "fx" or "hooks"
    tied: list[str] = field(default_factory=list)  # block tensors that stay tied to other modules (reused, not copied)

    def summary(self, limit: int = 5) -> str:
        """One line: counts, then the first ``limit`` rejected candidates and why."""
        rejected = [s for s in self.skipped if s.conv_path is not None]
        text = (f"{len(self.converted)} conv+BN pairs -> {self.block} blocks, {len(self.ineligible)} pairs of other "
                f"geometry kept, {len(self.skipped)} BNs unpaired ({len(rejected)} of them after a conv)")
        if self.tied:
            text += f"; {len(self.tied)} tied tensors kept shared ({', '.join(self.tied[:limit])})"
        if rejected:
            text += "; rejected: " + "; ".join(f"{s.conv_path} -> {s.bn_path}: {s.reason}" for s in rejected[:limit])
        return text


def self_reparameterizing(model: nn.Module) -> list[str]:
    """Dotted paths of the non-root modules that have their own ``fuse``/``reparameterize``/``switch_to_deploy``."""
    return [path for path, m in model.named_modules() if path and any(protocol_method(m, n) for n in METHODS)]


def convert_model_with_report(
    model: nn.Module,
    block: Literal["acb", "dbb", "repvgg"] = "acb",
    preserve: bool = False,
    example_input: Any = None,
    **block_kwargs: Any,
) -> Conversion:
    """:func:`convert_model` that returns a :class:`Conversion` (which pairs were converted, skipped and why).

    Raises:
        ValueError: as :func:`convert_model`.
    """
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} is not supported; allowed: {', '.join(map(repr, BLOCKS))}")
    cls = BLOCKS[block]
    found = find_conv_bn_pairs(model, example_input)
    report = Conversion(block, skipped=list(found.skipped), method=found.method)
    owners = self_reparameterizing(model)
    users = parameter_users(model)
    for pair in found.pairs:
        owner = next((o for o in owners if pair.conv_path.startswith(o + ".") or pair.bn_path.startswith(o + ".")), None)
        if owner is not None:
            kind = type(model.get_submodule(owner)).__name__
            report.skipped.append(SkippedBN(pair.bn_path, f"inside {owner} ({kind}), which re-parameterizes itself"))
            continue
        conv, bn = pair.conv, pair.bn
        geometry = eligible(conv, block)
        if geometry is None:
            report.ineligible.append(pair.conv_path)
            continue
        untie = _untieable(users, conv, bn)
        if untie is not None:
            report.skipped.append(SkippedBN(pair.bn_path, untie, pair.conv_path))
            warnings.warn(f"convert_model: {pair.conv_path} -> {pair.bn_path} left as it is: {untie}", UserWarning,
                          stacklevel=3)
            continue
        new = cls(conv.in_channels, conv.out_channels, act_layer=None, **geometry, **block_kwargs)
        new.to(device=conv.weight.device, dtype=conv.weight.dtype, memory_format=memory_format_of(conv.weight))
        report.tied += [f"{pair.conv_path}:{t}" for t in _load_main(new, conv, bn, preserve, users)]
        new.train(conv.training)
        tail = bn_tail(bn)
        tail.train(bn.training)
        setattr(pair.conv_parent, pair.conv_name, new)
        setattr(pair.bn_parent, pair.bn_name, tail)
        report.converted.append(pair.conv_path)
    if not report.converted:
        raise ValueError(
            f"convert_model: no eligible Conv2d -> BatchNorm pair in {type(model).__name__} for block={block!r} "
            f"(needs a square odd kernel >= 3 whose output only feeds a BatchNorm2d): {report.summary()}"
        )
    log.info("convert_model: %s", report.summary())
    if block == "repvgg" and not any(getattr(m, "identity", None) is not None for m in model.modules()
                                     if isinstance(m, RepVGGBlock)):
        warnings.warn("convert_model: no converted layer keeps in == out with stride 1, so no identity branch was added",
                      UserWarning, stacklevel=3)
    return report


def convert_model(
    model: nn.Module,
    block: Literal["acb", "dbb", "repvgg"] = "acb",
    preserve: bool = False,
    example_input: Any = None,
    **block_kwargs: Any,
) -> nn.Module:
    """Replace every eligible ``Conv2d -> BN`` pair of ``model`` (in place) by a training-time block; returns ``model``.

    Args:
        model: any ``nn.Module``: a timm or torchvision model, a user CNN, a lightning_nd subnet.
        block: ``"acb"`` (ACNet), ``"dbb"`` (Diverse Branch Block) or ``"repvgg"`` (3x3 + 1x1 + identity).
        preserve: keep the model's function (extra branches start at zero); otherwise the extra branches get the
            default initialisation (for training from scratch).
        example_input: a sample input, used only when the model does not trace with ``torch.fx``.
        **block_kwargs: passed to every block (e.g. ``gamma_init=1/3`` for ACB, ``internal_channels`` for DBB).

    Raises:
        ValueError: for an unknown block, block arguments the block rejects, a model that neither traces nor came
            with ``example_input``, or when the model has no eligible pair (the message lists rejected candidates).

    Example::

        net = convert_model(torchvision.models.resnet18(num_classes=10), "dbb")
    """
    convert_model_with_report(model, block, preserve, example_input, **block_kwargs)
    return model
