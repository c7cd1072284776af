"""The ``Choice`` layer: one decision point of a one-shot supernet.

A supernet is an ordinary ``nn.Module`` with ``Choice`` layers somewhere inside. Each ``Choice`` holds its
candidate ops, a boolean ``alive`` mask (a persistent buffer, so search-space shrinking survives checkpoints
and never deletes parameters under DDP) and the index of the active candidate, which its forward runs.

Several ``Choice`` layers may share one decision through a common ``key`` (the NAS-Bench-201 supernet repeats
one cell architecture in every cell); an architecture is one candidate index per decision, see
:mod:`lightning_nd.nas.arch`.

:class:`InputChoice` is a ``Choice`` whose candidates are the ``C(n, k)`` ways to pick ``k`` of ``n`` inputs (DARTS:
2 of a node's predecessors), so it is a decision like any other: one index, an ``alive`` mask over combinations,
sampled, pruned, mutated and exported by the same code. A ``Choice`` that sits on one input edge is *gated* by it
(``gate = (input_choice_key, input_position)``): it runs, costs and counts only when that input is chosen.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


class Choice(nn.Module):
    """Pick one of several candidate ops; the active one runs in ``forward``.

    Args:
        candidates: the candidate ops, as a list (named by class) or a ``{name: module}`` mapping.
        key: decision key; ``Choice`` layers with the same key always take the same index. ``None`` makes the
            layer its own decision.
        names: op names for a list of candidates (default: the class names, made unique).

    Raises:
        ValueError: with no candidates, or names that do not match the candidates.

    Example::

        block = Choice({"conv3x3": nn.Conv2d(16, 16, 3, padding=1), "conv5x5": nn.Conv2d(16, 16, 5, padding=2)})
        block.active = 1
        y = block(x)
    """

    def __init__(
        self,
        candidates: Sequence[nn.Module] | Mapping[str, nn.Module],
        key: str | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(candidates, Mapping):
            if names is not None:
                raise ValueError("pass names only with a list of candidates, not with a mapping")
            names, modules = list(candidates.keys()), list(candidates.values())
        else:
            modules = list(candidates)
        if not modules:
            raise ValueError(f"Choice(key={key!r}) has no candidates; give at least one candidate op")
        for i, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise ValueError(f"candidate {i} of Choice(key={key!r}) is a {type(module).__name__}, not an nn.Module")
        if names is None:
            names = _unique([type(m).__name__ for m in modules])
        names = [str(n) for n in names]
        if len(names) != len(modules) or len(set(names)) != len(names):
            raise ValueError(f"Choice(key={key!r}) needs {len(modules)} distinct names, got {names}")
        self.candidates = nn.ModuleList(modules)
        self.names: list[str] = names
        self.key = key
        self.label: str = key or "<unnamed Choice>"  # set to the module path by list_choices
        self.register_buffer("alive", torch.ones(len(modules), dtype=torch.bool), persistent=True)
        self.active: int | None = None
        self.gate: tuple[str, int] | None = None  # (InputChoice key, input position): used only if that input is chosen
        self._shapes_checked = False

    def __len__(self) -> int:
        return len(self.candidates)

    @property
    def alive_indices(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive.tolist()) if ok]

    def extra_repr(self) -> str:
        return f"key={self.key!r}, ops={self.names}, active={self.active}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active is None:
            raise RuntimeError(f"Choice {self.label!r} has no active candidate: set an architecture first (set_arch)")
        if not self._shapes_checked:
            self._check_shapes(args, kwargs)
        return self.candidates[self.active](*args, **kwargs)

    @torch.no_grad()
    def _check_shapes(self, args: tuple, kwargs: dict) -> None:
        """On the first forward, run every candidate once (in eval mode) and compare output shapes."""
        modes = [m.training for m in self.candidates.modules()]
        self.candidates.eval()
        try:
            shapes = {}
            for name, op in zip(self.names, self.candidates):
                out = op(*args, **kwargs)
                shapes[name] = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        finally:
            for module, mode in zip(self.candidates.modules(), modes):
                module.training = mode
        if len(set(shapes.values())) > 1:
            raise ValueError(f"candidates of Choice {self.label!r} give different output shapes: {shapes}")
        self._shapes_checked = True


class PickInputs(nn.Module):
    """One candidate of an :class:`InputChoice`: returns the chosen inputs of a sequence, in order (no weights)."""

    angle_kind = "none"

    def __init__(self, chosen: Sequence[int]) -> None:
        super().__init__()
        self.chosen: tuple[int, ...] = tuple(int(i) for i in chosen)

    def forward(self, inputs: Sequence[Any]) -> list[Any]:
        return [inputs[i] for i in self.chosen]

    def extra_repr(self) -> str:
        return f"chosen={self.chosen}"


class InputChoice(Choice):
    """Pick ``n_chosen`` distinct inputs out of ``n_candidates``: one decision over the ``C(n, k)`` combinations.

    The candidates are :class:`PickInputs` modules named ``"0+1"``, ``"0+2"``, ... (sorted input positions, in
    ``itertools.combinations`` order); ``forward(inputs)`` returns the list of chosen inputs. Ops on the input edges
    are ordinary :class:`Choice` layers whose ``gate`` names this layer's key and their input position.

    Args:
        n_candidates: number of candidate inputs (``>= n_chosen``).
        n_chosen: how many distinct inputs are picked.
        key: decision key (layers with the same key pick the same inputs; needed to gate edge ops).

    Raises:
        ValueError: for ``n_chosen < 1`` or ``n_chosen > n_candidates``.

    Example::

        pick = InputChoice(4, n_chosen=2, key="node3.inputs")
        pick.active = pick.names.index("0+2")
        h0, h2 = pick([s0, s1, s2, s3])
    """

    def __init__(self, n_candidates: int, n_chosen: int = 2, key: str | None = None) -> None:
        n_candidates, n_chosen = int(n_candidates), int(n_chosen)
        if not 1 <= n_chosen <= n_candidates:
            raise ValueError(
                f"InputChoice(key={key!r}) picks n_chosen={n_chosen} of n_candidates={n_candidates} inputs; "
                "need 1 <= n_chosen <= n_candidates"
            )
        combos = list(itertools.combinations(range(n_candidates), n_chosen))
        super().__init__([PickInputs(c) for c in combos], key=key, names=["+".join(map(str, c)) for c in combos])
        self.n_candidates, self.n_chosen = n_candidates, n_chosen
        self.combinations: list[tuple[int, ...]] = combos
        self._shapes_checked = True  # candidates return lists of inputs, not one tensor

    @property
    def chosen(self) -> tuple[int, ...]:
        """Input positions picked by the active combination."""
        if self.active is None:
            raise RuntimeError(f"InputChoice {self.label!r} has no active candidate: set an architecture first")
        return self.combinations[self.active]

    def extra_repr(self) -> str:
        return f"key={self.key!r}, {self.n_chosen} of {self.n_candidates} inputs, active={self.active}"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 and names.count(name) == 1 else f"{name}_{count}")
    return out
