"""The deploy protocol: turn every re-parameterizable module of any model into its inference form.

Three method names are in use (reference: timm ``reparameterize_model``, ml-mobileone, DingXiaoH's repos):

* ``fuse()`` returns a replacement module, which is set on the parent (timm RepViT, LeViT, TinyViT, ...);
* ``reparameterize()`` converts in place (timm byobnet/FastViT/MobileOne, and every lightning_nd block);
* ``switch_to_deploy()`` converts in place (official RepVGG, ACNet, DBB).

:func:`reparameterize_model` walks the model top-down **starting at the root** (timm's helper skips the root), calls
the first method a module has, in that order, then descends into what remains. Every converted module is marked, so a
second call (or a model converted before) never calls a third-party converter twice (timm's FastViT ``RepMixer``
raises on a second ``reparameterize()``). Only methods count: a child module named ``fuse`` (a feature-fusion layer)
is not taken for the protocol. Optionally, remaining ``Conv2d -> BN`` pairs are folded (:func:`fold_conv_bn_pairs`),
e.g. the 10 BNs timm's FastViT keeps in its ``ConvMlp``; pairs come from the dataflow
(:func:`~lightning_nd.reparam.pairs.find_conv_bn_pairs`), so a pre-activation BN is never folded into the wrong conv.
The training flag of every module is preserved; outputs only agree in ``eval()`` (BNs in train mode use batch
statistics).

Example::

    deploy = reparameterize_model(timm.create_model("mobileone_s0").eval(), fold_bn=True)
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_nd.reparam.fusion import bn_scale_shift, fold_bn, work_dtype
from lightning_nd.reparam.pairs import SkippedBN, bn_tail, find_conv_bn_pairs, parameter_users

__all__ = [
    "FOLDED_MARK",
    "METHODS",
    "ReparamStats",
    "fold_conv_bn_pairs",
    "protocol_method",
    "reparameterize_model",
    "reparameterize_with_stats",
]

METHODS = ("fuse", "reparameterize", "switch_to_deploy")
_MARK = "_lnd_reparameterized"
FOLDED_MARK = "_lnd_folded_bn"  # set on a model whose conv -> BN pairs were folded


@dataclass
class ReparamStats:
    """What a conversion did (returned by :func:`reparameterize_with_stats`).

    Raises:
        Nothing: a plain record.

    Example::

        fused, stats = reparameterize_with_stats(model, fold_bn=True)
        print(stats.converted, stats.folded_bn, stats.total)    # {'reparameterize': 22} 0 22
    """

    converted: dict[str, int] = field(default_factory=dict)  # method name -> modules converted by it
    folded_bn: int = 0  # conv -> BN pairs folded by the generic pass
    skipped: int = 0  # modules skipped because an earlier conversion marked them
    unfolded_bn: list[SkippedBN] = field(default_factory=list)  # BNs the fold pass left, with the reason
    untied: list[str] = field(default_factory=list)  # tied tensors the fold gave a folded copy (the others keep it)

    @property
    def total(self) -> int:
        return sum(self.converted.values()) + self.folded_bn


def protocol_method(module: nn.Module, name: str) -> Any:
    """``module.<name>`` if it is a method (bound function), else ``None``: a child *module* named ``fuse`` is not."""
    method = getattr(module, name, None)
    return method if inspect.ismethod(method) else None


def _mark(module: nn.Module) -> None:
    object.__setattr__(module, _MARK, True)


def _convert(module: nn.Module, methods: tuple[str, ...], stats: ReparamStats) -> nn.Module:
    """Convert ``module`` (maybe replacing it) and then its children; returns what takes its place."""
    if getattr(module, _MARK, False):
        stats.skipped += 1
    else:
        for name in methods:
            method = protocol_method(module, name)
            if method is None:
                continue
            result = method()
            _mark(module)
            stats.converted[name] = stats.converted.get(name, 0) + 1
            if name == "fuse":
                if not isinstance(result, nn.Module):
                    raise TypeError(f"{type(module).__name__}.fuse() returned {type(result).__name__}, not a module")
                _mark(result)
                module = result
            break
    for child_name, child in list(module.named_children()):
        new = _convert(child, methods, stats)
        if new is not child:
            setattr(module, child_name, new)
    return module


def _fresh_parameter(value: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype) -> nn.Parameter:
    """A new parameter holding ``value`` in ``like``'s dtype, device and memory format (channels-last stays)."""
    if like is None:
        return nn.Parameter(value.to(dtype).clone())
    out = torch.empty_like(like)
    out.copy_(value.to(like.dtype))
    return nn.Parameter(out, requires_grad=like.requires_grad)


def _folded_convs(conv: nn.Module, bn: _BatchNorm) -> list[tuple[nn.Conv2d, torch.Tensor, torch.Tensor]]:
    """``(conv, weight, bias)`` with the BN folded, float32: the conv itself, or each conv of a ``MixedConv2d`` with
    the BN's channel slice (its outputs are concatenated in registration order)."""
    if isinstance(conv, nn.Conv2d):
        return [(conv, *fold_bn(conv.weight, bn, conv.bias))]
    t, shift = bn_scale_shift(bn, work_dtype(next(conv.parameters()).dtype))
    out, start = [], 0
    for part in conv.children():
        s = slice(start, start + part.out_channels)
        w = part.weight.detach().to(t.dtype) * t[s].reshape(-1, 1, 1, 1)
        b = shift[s] + (part.bias.detach().to(t.dtype) * t[s] if part.bias is not None else 0)
        out.append((part, w, b))
        start = s.stop
    return out


@torch.no_grad()
def fold_conv_bn_pairs(model: nn.Module, example_input: Any = None) -> tuple[int, list[SkippedBN], list[str]]:
    """Fold every ``Conv2d -> _BatchNorm`` pair whose dataflow is verified (:mod:`lightning_nd.reparam.pairs`), in place.

    The conv gets the folded kernel and bias as **new** parameters (computed in float32, cast back, memory format
    kept), the BN is replaced by ``Identity`` (or by the dropout/activation of timm's ``BatchNormAct2d``). A weight
    shared with other modules (tied weights, a conv and a ``ConvTranspose2d`` on one tensor) is never written to: the
    folded conv gets its own copy, and convs that shared a tensor share the folded one again only when every user of
    that tensor was folded to bit-identical values. Returns the number of pairs folded, the BNs left (with the
    reason), and one line per tie that the fold had to break (``"conv.weight, shared with other.weight: ..."``).

    Raises:
        ValueError: when the model does not trace with ``torch.fx`` and no ``example_input`` was given.
    """
    found = find_conv_bn_pairs(model, example_input)
    users = parameter_users(model)
    # (pair, conv, folded weight, folded bias) per conv: one for a Conv2d, one per channel split of a MixedConv2d
    folded: list[tuple[Any, nn.Conv2d, torch.Tensor, torch.Tensor]] = []
    for pair in found.pairs:
        folded += [(pair, conv, w, b) for conv, w, b in _folded_convs(pair.conv, pair.bn)]
    # convs by the original tensor they read: a tie survives only if all its users fold to identical values
    groups: dict[int, list[int]] = {}
    for i, (_, conv, _, _) in enumerate(folded):
        for name in ("weight", "bias"):
            tensor = getattr(conv, name)
            if tensor is not None:
                groups.setdefault(id(tensor), []).append(i)
    broken: list[str] = []
    kept_ties: dict[tuple[int, str], nn.Parameter] = {}
    for pair, conv, w, b in folded:
        for name, value in (("weight", w), ("bias", b)):
            old = getattr(conv, name)
            shared = [u for u in users.get(id(old), []) if u[0] is not conv] if old is not None else []
            if not shared:
                setattr(conv, name, _fresh_parameter(value, old, conv.weight.dtype))
                continue
            members = groups[id(old)]
            folded_convs = {id(folded[j][1]) for j in members}
            keep = all(id(u[0]) in folded_convs for u in shared) and all(
                torch.equal(folded[j][2] if name == "weight" else folded[j][3], value) for j in members
            )
            if keep:  # every user folds to the same tensor: they share the folded one
                if (id(old), name) not in kept_ties:
                    kept_ties[(id(old), name)] = _fresh_parameter(value, old, conv.weight.dtype)
                setattr(conv, name, kept_ties[(id(old), name)])
                continue
            others = ", ".join(sorted({u[1] for u in shared}))
            broken.append(f"{pair.conv_path}.{name}, shared with {others}: folded into a copy "
                          "(the other users keep the unfolded tensor)")
            setattr(conv, name, _fresh_parameter(value, old, conv.weight.dtype))
    for pair in found.pairs:  # once per pair (a MixedConv2d pair has several folded convs)
        tail = bn_tail(pair.bn)
        tail.train(pair.bn.training)
        setattr(pair.bn_parent, pair.bn_name, tail)
    return len(found.pairs), found.skipped, broken


def _restore_modes(model: nn.Module, modes: dict[nn.Module, bool]) -> None:
    """Every module that existed gets its own flag back (a frozen BN stays in eval); new ones take their parent's."""
    model.training = modes.get(model, model.training)
    for parent in model.modules():
        for child in parent.children():
            child.training = modes.get(child, parent.training)


def reparameterize_with_stats(
    model: nn.Module,
    inplace: bool = False,
    fold_bn: bool = False,
    methods: tuple[str, ...] = METHODS,
    warn: bool = True,
    example_input: Any = None,
) -> tuple[nn.Module, ReparamStats]:
    """:func:`reparameterize_model` that also returns :class:`ReparamStats`.

    Raises:
        ValueError: for an unknown method name, or ``fold_bn`` on a model that does not trace with ``torch.fx``
            without ``example_input``.
        TypeError: when a ``fuse()`` returns something that is not a module.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods={methods!r}: each must be one of {METHODS}")
    if not inplace:
        model = copy.deepcopy(model)
    modes = {m: m.training for m in model.modules()}
    stats = ReparamStats()
    model = _convert(model, tuple(methods), stats)
    if fold_bn:
        stats.folded_bn, stats.unfolded_bn, stats.untied = fold_conv_bn_pairs(model, example_input)
        object.__setattr__(model, FOLDED_MARK, True)  # save_deploy reads it: load_deploy must fold the same way
        if warn and stats.untied:
            warnings.warn(f"reparameterize_model: {len(stats.untied)} tied tensor(s) folded into a copy: "
                          + "; ".join(stats.untied), UserWarning, stacklevel=3)
    _restore_modes(model, modes)
    if warn and stats.total == 0:
        hint = "" if fold_bn else " (fold_bn=True would also fold plain conv -> BN pairs)"
        what = "already converted" if stats.skipped else "nothing to fuse"
        warnings.warn(
            f"reparameterize_model: {what} in {type(model).__name__}: no module has {'/'.join(methods)}(){hint}",
            UserWarning,
            stacklevel=3,
        )
    return model, stats


def reparameterize_model(
    model: nn.Module,
    inplace: bool = False,
    fold_bn: bool = False,
    methods: tuple[str, ...] = METHODS,
    example_input: Any = None,
) -> nn.Module:
    """The deploy form of ``model``: every module's ``fuse()``/``reparameterize()``/``switch_to_deploy()``, root included.

    Args:
        model: any model; its blocks may come from lightning_nd, timm or the official repos.
        inplace: convert ``model`` itself; by default a deep copy is converted and returned.
        fold_bn: also fold the remaining ``Conv2d -> BN`` pairs (inference only).
        methods: the protocol's method names in priority order.
        example_input: a sample input for ``fold_bn`` on models that ``torch.fx`` cannot trace.

    Raises:
        ValueError: for an unknown method name, or ``fold_bn`` on an untraceable model without ``example_input``.
        TypeError: when a ``fuse()`` returns something that is not a module.

    Warns:
        UserWarning: when nothing was converted (nothing to fuse, or the model was converted before).

    Example::

        model = RepVGGBlock(8, 8).eval()
        fused = reparameterize_model(model)     # model is untouched; fused has one conv
    """
    return reparameterize_with_stats(model, inplace, fold_bn, methods, example_input=example_input)[0]


def count_batchnorms(model: nn.Module) -> int:
    """Number of ``_BatchNorm`` modules left in ``model``."""
    return sum(isinstance(m, _BatchNorm) for m in model.modules())
