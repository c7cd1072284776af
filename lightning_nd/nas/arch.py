"""Architectures of a supernet: listing its decisions, getting/setting/encoding an architecture, exporting a subnet.

An architecture is a ``list[int]``: one candidate index per *decision*, in the order in which the decisions'
first ``Choice`` appears in ``model.modules()``. A decision is a ``Choice`` key; ``Choice`` layers without a
key are decisions of their own, named by their module path. The JSON form adds the op names, so an
architecture file stays readable and is checked against the space it is loaded into.

Input choices (:class:`~lightning_nd.nas.choice.InputChoice`) are decisions too; a decision whose layers are gated by
one (the op on an input edge) is *used* by an architecture only when that input is chosen (:func:`used_mask`). The
index of an unused decision does not change the network; :func:`canonical_arch` sets it to the first alive op so
equal networks get equal architectures.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lightning_nd.nas.choice import Choice, InputChoice


@dataclass
class Decision:
    """One decision of a supernet: its key, the op names and every ``Choice`` layer that follows it."""

    key: str  # the Choice key, or the module path of a key-less Choice
    names: list[str]  # op names, identical for every layer of the decision
    layers: list[Choice]  # the Choice layers that take this decision
    gate: tuple[int, int] | None = None  # (index of the gating input decision, input position), see used_mask
    combinations: list[tuple[int, ...]] | None = None  # for an input decision: the inputs each index picks

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
        ValueError: when layers sharing a key have different op names or gates, or a gate names no input choice.
    """
    groups: dict[str, Decision] = {}
    for name, choice in ((c.label, c) for c in list_choices(model)):
        key = choice.key or name
        if key in groups:
            if groups[key].names != choice.names:
                raise ValueError(
                    f"Choice layers with key {key!r} have different ops: {groups[key].names} vs {choice.names}"
                )
            if groups[key].layers[0].gate != choice.gate:
                raise ValueError(
                    f"Choice layers with key {key!r} have different gates: {groups[key].layers[0].gate} vs {choice.gate}"
                )
            groups[key].layers.append(choice)
        else:
            combos = list(choice.combinations) if isinstance(choice, InputChoice) else None
            groups[key] = Decision(key, list(choice.names), [choice], combinations=combos)
    found = list(groups.values())
    index = {d.key: i for i, d in enumerate(found)}
    for d in found:
        gate = d.layers[0].gate
        if gate is None:
            continue
        g = index.get(gate[0])
        if g is None or found[g].combinations is None:
            raise ValueError(f"decision {d.key!r} is gated by {gate[0]!r}, which is not an InputChoice key of the model")
        if not 0 <= int(gate[1]) < max(max(c) for c in found[g].combinations) + 1:
            raise ValueError(f"decision {d.key!r} is gated by input {gate[1]} of {gate[0]!r}, which has no such input")
        d.gate = (g, int(gate[1]))
    return found


def used_mask(found: list[Decision], archs: Any) -> np.ndarray:
    """Which decisions each architecture uses: an ``(n, decisions)`` bool array for an ``(n, decisions)`` int array.

    A decision gated by an input choice is used only when that input is chosen (and the input decision is used).
    """
    archs = np.atleast_2d(np.asarray(archs, dtype=np.int64))
    used = np.ones(archs.shape, dtype=bool)
    for _ in range(2):  # a second pass settles gates of gates in any order
        for d_idx, d in enumerate(found):
            if d.gate is None:
                continue
            g, pos = d.gate
            picks = np.array([pos in c for c in found[g].combinations], dtype=bool)
            used[:, d_idx] = picks[archs[:, g]] & used[:, g]
    return used


def canonical_archs(found: list[Decision], archs: Any, options: list[list[int]] | None = None) -> np.ndarray:
    """Every row of an ``(n, decisions)`` array with its unused decisions set to their first alive option."""
    archs = np.atleast_2d(np.asarray(archs, dtype=np.int64)).copy()
    if not any(d.gate is not None for d in found):
        return archs
    options = options if options is not None else [d.alive for d in found]
    first = np.array([int(opts[0]) if opts else 0 for opts in options], dtype=np.int64)
    used = used_mask(found, archs)
    return np.where(used, archs, first[None, :])


def canonical_arch(found: list[Decision], arch: list[int], options: list[list[int]] | None = None) -> list[int]:
    """``arch`` with every unused decision set to its first alive option (the same network, one spelling)."""
    return canonical_archs(found, [arch], options)[0].tolist()


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
    """Number of distinct networks left in the (alive) space.

    Ops on input edges count only for the input combinations that choose them: an input decision contributes
    ``Σ_alive combinations Π_chosen edges (alive ops)`` instead of its number of combinations.
    """
    found = _require(model)
    gated: dict[int, dict[int, list[int]]] = {}  # input decision -> input position -> gated decisions
    for d_idx, d in enumerate(found):
        if d.gate is not None:
            gated.setdefault(d.gate[0], {}).setdefault(d.gate[1], []).append(d_idx)
    size = 1
    for d_idx, d in enumerate(found):
        if d.gate is not None:
            continue  # counted with its input decision
        if d_idx not in gated:
            size *= len(d.alive)
            continue
        edges = gated[d_idx]
        size *= sum(
            math.prod(len(found[e].alive) for pos in d.combinations[c] for e in edges.get(pos, []))
            for c in d.alive
        )
    return size


def arch_to_json(model: nn.Module, arch: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    """Encode ``arch`` (default: the active one) with its op names; ``extra`` keys are added (scores, FLOPs, ...).

    A space with a ``describe_arch(arch) -> dict`` method adds its own fields (the DARTS space: ``"genotype"``).
    """
    arch = get_arch(model) if arch is None else [int(i) for i in arch]
    found = check_arch(model, arch, allow_dead=True)
    ops = {d.key: d.names[i] for d, i in zip(found, arch)}
    describe = getattr(model, "describe_arch", None)  # a space's own form, e.g. the DARTS genotype
    described = describe(arch) if callable(describe) else {}
    return {"arch": arch, "ops": ops, **described, **extra}


def arch_from_json(model: nn.Module, data: dict[str, Any] | str | Path, allow_dead: bool = True) -> list[int]:
    """Decode an architecture from :func:`arch_to_json` output or an ``arch.json`` file, checked against ``model``.

    ``arch.json`` files written by ``EvolutionSearch`` keep the best architecture under ``"best"``; that entry is used.

    Raises:
        ValueError: when the architecture does not fit the space (unknown decision, unknown op, wrong length), or
            when the file gives both ``arch`` indices and ``ops`` names and they disagree (naming the decision and
            both values; neither silently wins).
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
    given = data.get("arch")
    if given is not None:
        if not isinstance(given, (list, tuple)) or len(given) != len(arch):
            raise ValueError(
                f"architecture JSON 'arch' must be a list of {len(arch)} indices (one per decision), got {given!r}"
            )
        for d, index, name_index in zip(found, given, arch):
            if int(index) != name_index:
                named = d.names[int(index)] if 0 <= int(index) < len(d.names) else "out of range"
                raise ValueError(
                    f"architecture JSON disagrees on decision {d.key!r}: 'arch' gives index {int(index)} "
                    f"({named!r}) but 'ops' gives {ops[d.key]!r} (index {name_index}); fix one of them"
                )
    check_arch(model, arch, allow_dead)
    return arch


class UnusedEdge(nn.Module):
    """Stands in an exported subnet for an op on an input that the architecture does not choose (never runs)."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"the op {self.label!r} is on an input the architecture does not choose; it cannot run")


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
    in_use = used_mask(found, [arch])[0]
    unused_layers = {id(layer) for d, u in zip(found, in_use) if not u for layer in d.layers}
    used: set[int] = set()
    stack = [model]
    while stack:  # the modules reachable along the chosen path (a module shared with the path is used)
        module = stack.pop()
        if id(module) in used:
            continue
        used.add(id(module))
        if isinstance(module, Choice):
            if id(module) not in unused_layers:
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
    copied_unused = {id(memo[i]) for i in unused_layers if i in memo}

    def chosen(module: nn.Module) -> nn.Module:
        while isinstance(module, Choice):
            if id(module) in copied_unused:
                return UnusedEdge(module.label)
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
