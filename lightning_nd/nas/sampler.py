"""Synchronised single-path sampling: the same path on every rank, from ``(seed, global step)`` alone.

SPOS trains one uniformly sampled path per optimizer step. Under DDP every rank must train the *same* path
(otherwise each rank trains another path on its local batch and DDP averages gradients of different ops with
op-dependent dilution, see ``nas.md`` §7). :class:`PathSampler` draws the path from a dedicated
``numpy.random.Generator`` seeded with ``[seed, step]``: identical on all ranks with no communication, independent
of any other random-number use, and a resumed run continues the same sequence because the global step is restored.

Constraints (a FLOPs or parameter range, see :class:`~lightning_nd.nas.flops.CostConstraint`) are enforced by
rejection sampling from the same seeded generator, so they stay deterministic; SPOS's FLOPs-bin sampling
(``flops_bins``) first picks a bin uniformly, then rejection-samples a path inside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_nd.nas.arch import Decision, canonical_arch, decisions


def arch_hash(arch: Sequence[int]) -> int:
    """A stable 62-bit hash of an architecture (for cross-rank agreement checks)."""
    digest = hashlib.blake2b(",".join(str(int(i)) for i in arch).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def uniform_archs(rng: np.random.Generator, options: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """``n`` architectures, each decision uniform over its ``options``: an ``(n, decisions)`` int64 array."""
    out = np.empty((n, len(options)), dtype=np.int64)
    for d, opts in enumerate(options):
        out[:, d] = np.asarray(opts, dtype=np.int64)[rng.integers(0, len(opts), size=n)]
    return out


class PathSampler:
    """Uniform path sampling over the alive candidates, keyed by ``(seed, step)``.

    Args:
        model: the supernet (its ``Choice`` layers and their ``alive`` masks are read at every call, so a
            shrunk space is sampled from as soon as it is masked).
        seed: base seed shared by all ranks.
        constraint: an optional ``arch -> bool`` predicate (e.g. a :class:`~lightning_nd.nas.flops.CostConstraint`);
            paths are rejection-sampled until one satisfies it.
        flops_bins: SPOS FLOPs-bin sampling: a list of ``(low, high)`` ranges in the units of ``cost.flops``; a bin
            is picked uniformly per step, then a path inside it is rejection-sampled. Needs ``cost``.
        cost: an :class:`~lightning_nd.nas.flops.ArchCost` for ``flops_bins``.
        max_tries: rejection-sampling attempts per step (SPOS: 500).
        on_failure: ``"random"`` (SPOS: fall back to an unconstrained uniform path, with a one-time warning) or
            ``"raise"``.

    Raises:
        ValueError: for ``max_tries < 1``, an unknown ``on_failure``, ``flops_bins`` without ``cost`` or with an
            empty range, or a model without ``Choice`` layers.

    Example::

        sampler = PathSampler(supernet, seed=0)
        arch = sampler.sample(trainer.global_step)   # the same on every rank
        set_arch(supernet, arch)
    """

    def __init__(
        self,
        model: nn.Module,
        seed: int = 0,
        constraint: Callable[[list[int]], bool] | None = None,
        flops_bins: Sequence[Sequence[float]] | None = None,
        cost: Any = None,
        max_tries: int = 500,
        on_failure: str = "random",
    ) -> None:
        if max_tries < 1:
            raise ValueError(f"max_tries={max_tries} must be >= 1")
        if on_failure not in ("random", "raise"):
            raise ValueError(f"on_failure={on_failure!r} is not one of ('random', 'raise')")
        bins = [tuple(float(v) for v in b) for b in (flops_bins or [])]
        for b in bins:
            if len(b) != 2 or not b[0] < b[1]:
                raise ValueError(f"flops bin {b} must be a (low, high) pair with low < high")
        if bins and cost is None:
            raise ValueError("flops_bins needs cost=ArchCost(model, input_shape) to measure each path")
        # The decisions are listed once (the structure of a supernet is fixed); their alive masks are re-read
        # whenever one changed (see options()), so sampling needs no module walk and no host sync per step.
        self._decisions: list[Decision] = decisions(model)
        if not self._decisions:
            raise ValueError(f"{type(model).__name__} has no Choice layers: it is not a supernet")
        self.model, self.seed, self.constraint = model, int(seed), constraint
        self.flops_bins, self.cost = bins, cost
        self.max_tries, self.on_failure = int(max_tries), on_failure
        self._gated = any(d.gate is not None for d in self._decisions)
        self._warned = False
        self._masks: list[tuple[torch.Tensor, int]] = []
        self._options: list[list[int]] = []

    def rng(self, step: int, salt: int = 0) -> np.random.Generator:
        """The generator for ``step``: a pure function of ``(seed, step, salt)``."""
        return np.random.default_rng([self.seed, int(step) & 0xFFFFFFFFFFFF, int(salt)])

    def options(self) -> list[list[int]]:
        """The alive candidate indices of every decision (re-read only when an ``alive`` mask changed)."""
        masks = [d.layers[0].alive for d in self._decisions]
        # `_version` counts in-place writes (set_alive, load_state_dict's copy_); `.to()` makes a new tensor
        if len(masks) != len(self._masks) or any(
            m is not old or m._version != version for m, (old, version) in zip(masks, self._masks)
        ):
            self._options = [d.alive for d in self._decisions]
            self._masks = [(m, m._version) for m in masks]
        return [list(o) for o in self._options]

    def random_arch(self, rng: np.random.Generator, options: Sequence[Sequence[int]] | None = None) -> list[int]:
        """One unconstrained uniform path.

        Every decision is drawn uniformly from its alive options; with input choices this is uniform over the alive
        input combinations and, on each chosen edge, over its alive ops. Unused decisions (ops on inputs that are not
        chosen) are then set to their first alive op (:func:`~lightning_nd.nas.arch.canonical_arch`), so each network
        has one spelling.
        """
        options = options or self.options()
        arch = uniform_archs(rng, options, 1)[0].tolist()
        return canonical_arch(self._decisions, arch, options) if self._gated else arch

    def sample(self, step: int, salt: int = 0) -> list[int]:
        """The path of optimizer step ``step`` (identical on every rank and across resumes).

        Raises:
            RuntimeError: with ``on_failure="raise"`` when no path satisfies the constraint in ``max_tries``.
        """
        rng = self.rng(step, salt)
        options = self.options()
        if not self.flops_bins and self.constraint is None:
            return self.random_arch(rng, options)
        low, high = -np.inf, np.inf
        if self.flops_bins:
            low, high = self.flops_bins[int(rng.integers(0, len(self.flops_bins)))]
        for _ in range(self.max_tries):
            arch = self.random_arch(rng, options)
            if self.flops_bins and not low <= self.cost.flops(arch) < high:
                continue
            if self.constraint is not None and not self.constraint(arch):
                continue
            return arch
        message = (
            f"PathSampler found no path satisfying the constraint"
            f"{f' in FLOPs bin [{low:g}, {high:g})' if self.flops_bins else ''} in {self.max_tries} tries at step {step}"
        )
        if self.on_failure == "raise":
            raise RuntimeError(message + "; widen the range or raise max_tries")
        if not self._warned:
            rank_zero_warn(message + "; using an unconstrained path (SPOS behaviour; on_failure='raise' to stop)")
            self._warned = True
        return self.random_arch(rng, options)

    def verify_synced(self, arch: Sequence[int], strategy: Any) -> None:
        """Debug check: all-gather a hash of ``arch`` and fail loudly if the ranks disagree (a collective).

        Raises:
            RuntimeError: when at least two ranks hold different paths.
        """
        if getattr(strategy, "world_size", 1) <= 1:
            return
        local = torch.tensor([arch_hash(arch)], dtype=torch.int64, device=strategy.root_device)
        hashes = strategy.all_gather(local).reshape(-1).tolist()
        if len(set(hashes)) > 1:
            raise RuntimeError(
                f"path desynchronised across ranks: rank {strategy.global_rank} has {list(arch)}, hashes per rank "
                f"{hashes}. Something consumed the sampler's step differently on some rank."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
