"""Architectures of a supernet: listing its decisions, getting/setting/encoding an architecture, exporting a subnet.

An architecture is a ``list[int]``: one candidate index per *decision*, in the order in which the decisions'
first ``Choice`` appears in ``model.modules()``. A decision is a ``Choice`` key; ``Choice`` layers without a
key are decisions of their own, named by their module path. The JSON form adds the op names, so an
architecture file stays readable and is checked against the space it is loaded into.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lightning_nd.nas.choice import Choice


@dataclass
class Decision:
    """One decision of a supernet: its key, the op names and every ``Choice`` layer that follows it."""

    key: str  # the Choice key, or the module path of a key-less Choice
    names: list[str]  # op names, identical for every layer of the decision
    layers: list[Choice]  # the Choice layers that take this decision

    @property
    def alive(self) -> list[int]:
        """Indices of the candidates still in the space (masks agree across layers; the first layer's is read)."""
        return self.layers[0].alive_indices


def list_choices(model: nn.Module) -> list[Choice]:
    """Every ``Choice`` of ``model`` in ``modules()`` order; labels each with its module path for error messages."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, Choice):
            module.label = name or module.label
            found.append(module)
    return found


def decisions(model: nn.Module) -> list[Decision]:
    """The decisions of ``model`` in architecture order.

    Raises:
        ValueError: when layers sharing a key have different op names.
    """
    groups: dict[str, Decision] = {}
    for name, choice in ((c.label, c) for c in list_choices(model)):
        key = choice.key or name
        if key in groups:
            if groups[key].names != choice.names:
                raise ValueError(
                    f"Choice layers with key {key!r} have different ops: {groups[key].names} vs {choice.names}"
                )
            groups[key].layers.append(choice)
        else:
            groups[key] = Decision(key, list(choice.names), [choice])
    return list(groups.values())


def _require(model: nn.Module) -> list[Decision]:
    found = decisions(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no Choice layers: it is not a supernet")
    return found


def get_arch(model: nn.Module) -> list[int]:
    """The active architecture of ``model``.

    Raises:
        ValueError: when the model has no ``Choice`` or a decision has no active index.
    """
    arch = []
    for d in _require(model):
        if d.layers[0].active is None:
            raise ValueError(f"decision {d.key!r} has no active candidate; call set_arch first")
        arch.append(d.layers[0].active)
    return arch


def check_arch(model: nn.Module, arch: list[int], allow_dead: bool = False) -> list[Decision]:
    """Validate ``arch`` against the space of ``model`` and return its decisions.

    Raises:
        ValueError: on a wrong length, an index out of range, or (unless ``allow_dead``) a pruned candidate.
    """
    found = _require(model)
    if len(arch) != len(found):
        raise ValueError(f"architecture has {len(arch)} entries but the space has {len(found)} decisions")
    for d, index in zip(found, arch):
        if not 0 <= int(index) < len(d.names):
            raise ValueError(f"index {index} for decision {d.key!r} is out of range; allowed 0..{len(d.names) - 1}")
        if not allow_dead and int(index) not in d.alive:
            raise ValueError(
                f"op {d.names[index]!r} of decision {d.key!r} was pruned from the space; alive: "
                f"{[d.names[i] for i in d.alive]}"
            )
    return found


def set_arch(model: nn.Module, arch: list[int], allow_dead: bool = False) -> None:
    """Make ``arch`` the active architecture of every ``Choice`` in ``model`` (see :func:`check_arch`)."""
    activate(check_arch(model, arch, allow_dead), arch)


def activate(found: list[Decision], arch: list[int]) -> None:
    """Set ``arch`` on already listed decisions without re-walking the model or validating (training hot path).

    Use :func:`set_arch` unless ``arch`` is known to fit ``found`` (e.g. drawn by a ``PathSampler``).
    """
    for d, index in zip(found, arch):
        index = int(index)
        for layer in d.layers:
            # `active` is a plain attribute: skip nn.Module.__setattr__'s parameter/buffer/module bookkeeping
            object.__setattr__(layer, "active", index)


def alive_options(model: nn.Module) -> list[list[int]]:
    """The alive candidate indices of every decision."""
    return [d.alive for d in _require(model)]


def set_alive(model: nn.Module, decision: int, index: int, alive: bool) -> None:
    """Mask (``alive=False``) or restore a candidate in every layer of one decision; never deletes parameters.

    Raises:
        ValueError: when masking would leave the decision without a candidate.
    """
    d = _require(model)[decision]
    if not alive and d.alive == [index]:
        raise ValueError(f"cannot prune {d.names[index]!r}: it is the last alive op of decision {d.key!r}")
    for layer in d.layers:
        layer.alive[index] = alive


def space_size(model: nn.Module) -> int:
    """Number of architectures left in the (alive) space."""
    return math.prod(len(options) for options in alive_options(model))


def arch_to_json(model: nn.Module, arch: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    """Encode ``arch`` (default: the active one) with its op names; ``extra`` keys are added (scores, FLOPs, ...)."""
    arch = get_arch(model) if arch is None else [int(i) for i in arch]
    found = check_arch(model, arch, allow_dead=True)
    ops = {d.key: d.names[i] for d, i in zip(found, arch)}
    return {"arch": arch, "ops": ops, **extra}


def arch_from_json(model: nn.Module, data: dict[str, Any] | str | Path, allow_dead: bool = True) -> list[int]:
    """Decode an architecture from :func:`arch_to_json` output or an ``arch.json`` file, checked against ``model``.

    ``arch.json`` files written by ``EvolutionSearch`` keep the best architecture under ``"best"``; that entry is used.

    Raises:
        ValueError: when the architecture does not fit the space (unknown decision, unknown op, wrong length).
    """
    if isinstance(data, (str, Path)):
        data = json.loads(Path(data).read_text())
    if "best" in data and isinstance(data["best"], dict):
        data = data["best"]
    found = _require(model)
    ops = data.get("ops")
    if not isinstance(ops, dict):
        raise ValueError("architecture JSON needs an 'ops' mapping of decision key -> op name")
    keys = [d.key for d in found]
    if set(ops) != set(keys):
        raise ValueError(
            f"architecture does not fit the space: decisions {sorted(set(ops) ^ set(keys))[:6]} differ "
            f"(the space has {len(keys)} decisions, the file {len(ops)})"
        )
    arch = []
    for d in found:
        if ops[d.key] not in d.names:
            raise ValueError(f"op {ops[d.key]!r} is not a candidate of decision {d.key!r}; allowed: {d.names}")
        arch.append(d.names.index(ops[d.key]))
    check_arch(model, arch, allow_dead)
    return arch


def export_subnet(model: nn.Module, arch: list[int] | None = None, inherit_weights: bool = True) -> nn.Module:
    """A standalone network with only the chosen ops: every ``Choice`` replaced by its chosen candidate.

    Only the modules on the chosen path are copied (the unused candidates are never deep-copied).

    Args:
        model: the supernet (left unchanged).
        arch: the architecture (default: the active one).
        inherit_weights: keep the supernet's trained weights; ``False`` re-initialises every parameter
            (``reset_parameters`` where a module has one) for training from scratch.
    """
    arch = get_arch(model) if arch is None else [int(i) for i in arch]
    found = check_arch(model, arch, allow_dead=True)
    index = {id(layer): int(i) for d, i in zip(found, arch) for layer in d.layers}
    used: set[int] = set()
    stack = [model]
    while stack:  # the modules reachable along the chosen path (a module shared with the path is used)
        module = stack.pop()
        if id(module) in used:
            continue
        used.add(id(module))
        if isinstance(module, Choice):
            stack.append(module.candidates[index[id(module)]])
        else:
            stack.extend(module.children())
    memo: dict[int, Any] = {
        id(m): m  # "copied" as themselves: deepcopy leaves unused candidates alone; they are dropped below
        for layer in (lay for d in found for lay in d.layers)
        for op in layer.candidates
        for m in op.modules()
        if id(m) not in used
    }
    subnet = copy.deepcopy(model, memo)
    copied_index = {id(memo[i]): k for i, k in index.items() if i in memo}

    def chosen(module: nn.Module) -> nn.Module:
        while isinstance(module, Choice):
            module = module.candidates[copied_index[id(module)]]
        return module

    subnet = chosen(subnet)
    stack = [subnet]
    while stack:
        parent = stack.pop()
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Choice):
                child = chosen(child)
                setattr(parent, child_name, child)
            stack.append(child)
    if not inherit_weights:
        for module in subnet.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return subnet
