"""``ProgressivePruner``: angle-based search-space shrinking (ABS, ``megvii-model/AngleNAS``).

After ``warmup_epochs`` and then every ``interval`` epochs, every still-open op of a decision with more than one
op is scored by the mean angle of up to ``paths_per_op`` feasible paths that contain it (all paths of the space
when it is small enough to enumerate). Ops are ranked across all decisions and the ``drop_per_step`` lowest are
masked, skipping any op whose removal would empty its decision. Shrinking stops once the space holds at most
``space_threshold`` architectures. Optionally the AngleTracker's reference is reset once to the current weights
after ``reset_reference_after`` dropped ops (ABS: 50).

Input choices (DARTS) are decisions like any other: their input combinations are scored and masked as ops are,
and at least one combination, i.e. ``n_chosen`` inputs, always stays alive. An op on an input edge is scored only
over paths that choose that input (the sampled paths' input choice is redrawn among the alive combinations holding
it); an op whose every such combination was masked scores ``-inf`` and goes first.

Degenerate paths (every route cut by ``none``, or only parameter-free ops on the surviving routes) count with
angle 0, the AngleTracker's ``weight_free="zero"`` rule (RLNAS-NB201 gives disconnected cells 0): they lower the
mean of the ops they contain instead of lending them the fixed layers' angle. Near-ties are decided by a documented
rule (:meth:`ProgressivePruner.select_ops_to_drop`).

The decision is computed on rank 0 and broadcast, so near-ties can never split the ranks; dropped ops are
masked through the ``Choice.alive`` buffers (never deleted, so DDP buckets, optimizer groups and checkpoints stay
valid). The schedule state lives in ``state_dict``; the shrunk space is written atomically to
``<run dir>/shrunk_space.json`` and the space size is logged with a shrink-timeline picture.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_nd.callbacks.angle_tracker import AngleTracker, supernet_of
from lightning_nd.nas.angle import AngleStats, op_kind
from lightning_nd.nas.arch import Decision, alive_options, canonical_archs, decisions, set_alive, space_size, used_mask
from lightning_nd.nas.flops import ArchCost, CostConstraint
from lightning_nd.nas.sampler import uniform_archs
from lightning_nd.utils import atomic_write_text, log_image, progress, run_dir


def identity_ops(net: nn.Module) -> list[int | None]:
    """Per decision, the index of its identity op (``None`` if it has none)."""
    out: list[int | None] = []
    for d in decisions(net):
        kinds = [op_kind(op) for op in d.layers[0].candidates]
        out.append(kinds.index("identity") if "identity" in kinds else None)
    return out


class ProgressivePruner(Callback):
    """Shrink the supernet's search space by ABS's global angle ranking; needs an :class:`AngleTracker`.

    Args:
        warmup_epochs: epochs of plain supernet training before the first shrink step (ABS: 100).
        interval: epochs between shrink steps (ABS: 5).
        drop_per_step: ops dropped per step (default: ABS's ``op_num + 1``, the largest number of non-identity ops
            of a decision + 1: 7 on the mobilenet space).
        paths_per_op: sampled feasible paths per op (ABS: 1000), unique.
        exhaustive_below: enumerate every path instead of sampling when the space has at most this many.
        space_threshold: stop once the space has at most this many architectures (ABS: 1e6).
        max_steps: optional cap on shrink steps.
        reset_reference_after: reset the tracker's reference once when more than this many ops have been dropped
            (ABS: 50); ``None`` never.
        depth_sampling: ABS's random-depth sampling: non-identity ops uniformly, then a uniform number of
            identity layers at random identity-capable positions; False samples every decision uniformly.
        flops_range, params_range: optional feasibility ranges (MACs / parameters, inclusive) for scored paths.
        input_size: input side for the FLOPs table (default: the datamodule's ``input_shape``).
        seed: seed of the path sampling (combined with the step number).
        tie_decimals: op scores (radians) are compared rounded to this many decimals; ties go to the lower
            (decision, op) index (see :meth:`select_ops_to_drop`).

    Raises:
        MisconfigurationException: for invalid numbers; at setup when no AngleTracker is among the callbacks.
        ValueError: at setup when ``drop_per_step`` would empty a decision (more ops than can be dropped while
            keeping one per decision), or when a cost range is given without a known input size.

    Example::

        trainer = Trainer(callbacks=[AngleTracker(), ProgressivePruner(warmup_epochs=100, interval=5)])
    """

    def __init__(
        self,
        warmup_epochs: int = 100,
        interval: int = 5,
        drop_per_step: int | None = None,
        paths_per_op: int = 1000,
        exhaustive_below: int = 20000,
        space_threshold: float = 1e6,
        max_steps: int | None = None,
        reset_reference_after: int | None = None,
        depth_sampling: bool = True,
        flops_range: tuple[float | None, float | None] | None = None,
        params_range: tuple[float | None, float | None] | None = None,
        input_size: int | None = None,
        seed: int = 0,
        tie_decimals: int = 4,
    ) -> None:
        checks = {"warmup_epochs": (warmup_epochs, 0), "interval": (interval, 1), "paths_per_op": (paths_per_op, 1),
                  "exhaustive_below": (exhaustive_below, 0), "space_threshold": (space_threshold, 1)}
        if drop_per_step is not None:
            checks["drop_per_step"] = (drop_per_step, 1)
        if max_steps is not None:
            checks["max_steps"] = (max_steps, 1)
        if reset_reference_after is not None:
            checks["reset_reference_after"] = (reset_reference_after, 0)
        for name, (value, low) in checks.items():
            if value < low:
                raise MisconfigurationException(f"{name}={value} must be >= {low}")
        self.warmup_epochs, self.interval, self.drop_per_step = warmup_epochs, interval, drop_per_step
        self.paths_per_op, self.exhaustive_below, self.space_threshold = paths_per_op, exhaustive_below, space_threshold
        self.max_steps, self.reset_reference_after, self.depth_sampling = max_steps, reset_reference_after, depth_sampling
        self.flops_range, self.params_range, self.input_size, self.seed = flops_range, params_range, input_size, seed
        self.tie_decimals = tie_decimals
        self._warned_threshold = False
        self.steps_done, self.dropped_total, self.reset_done, self.finished = 0, 0, False, False
        self.timeline: list[dict[str, Any]] = []
        self.constraint: CostConstraint | None = None
        self._tracker: AngleTracker | None = None

    # ---------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trackers = [cb for cb in trainer.callbacks if isinstance(cb, AngleTracker)]
        if not trackers:
            raise MisconfigurationException("ProgressivePruner ranks ops by path angle: add an AngleTracker callback")
        self._tracker = trackers[0]
        net = supernet_of(pl_module)
        options = alive_options(net)
        droppable = sum(len(o) - 1 for o in options)
        if self.drop_per_step is None:
            self.drop_per_step = 1 + max(
                sum(op_kind(op) != "identity" for op in d.layers[0].candidates) for d in decisions(net)
            )
        if self.drop_per_step > droppable and not self.finished:
            raise ValueError(
                f"drop_per_step={self.drop_per_step} would empty a decision: only {droppable} ops can be dropped "
                f"while keeping one op per decision (alive ops per decision: {[len(o) for o in options]})"
            )
        size = space_size(net)
        if size <= self.space_threshold and not self.finished and not self._warned_threshold:
            rank_zero_warn(
                f"ProgressivePruner will never prune: the space already has {size} architectures <= "
                f"space_threshold={self.space_threshold:g}. Lower space_threshold (e.g. to {max(1, size // 10)})."
            )
            self._warned_threshold = True
        if self.flops_range or self.params_range:
            shape = getattr(getattr(trainer, "datamodule", None), "input_shape", None)
            size = self.input_size or getattr(net, "input_size", None)
            if self.input_size is not None or shape is None:
                if size is None:
                    raise ValueError("flops_range/params_range need input_size or a datamodule with input_shape")
                channels = shape[0] if shape is not None else getattr(pl_module.hparams, "in_chans", 3)
                shape = (channels, size, size)
            self.constraint = CostConstraint(ArchCost(net, shape), self.flops_range, self.params_range)

    def due(self, epoch: int) -> bool:
        """Whether a shrink step runs at the end of ``epoch`` (0-based)."""
        done = epoch + 1 - self.warmup_epochs
        return done >= 0 and done % self.interval == 0

    # ---------------------------------------------------------------- scoring
    def sample_paths(self, rng: np.random.Generator, options: list[list[int]], decision: int, op: int,
                     n: int, identity: list[int | None], found: list[Decision] | None = None) -> np.ndarray:
        """``n`` random paths with ``op`` forced at ``decision`` (ABS random-depth sampling when enabled).

        With ``found`` (the decisions) a decision gated by an input choice is made used: each path's input choice
        is redrawn among the alive combinations that hold its input (no path when there is none).
        """
        archs = self._sample_forced(rng, options, decision, op, n, identity)
        gate = found[decision].gate if found is not None else None
        if gate is not None:
            g, pos = gate
            holding = [c for c in options[g] if pos in found[g].combinations[c]]
            if not holding:
                return archs[:0]
            archs[:, g] = np.asarray(holding, dtype=np.int64)[rng.integers(0, len(holding), size=len(archs))]
        return archs

    def _sample_forced(self, rng: np.random.Generator, options: list[list[int]], decision: int, op: int,
                       n: int, identity: list[int | None]) -> np.ndarray:
        if not self.depth_sampling:
            archs = uniform_archs(rng, options, n)
            archs[:, decision] = op
            return archs
        body = [[o for o in opts if o != identity[d]] or opts for d, opts in enumerate(options)]
        archs = uniform_archs(rng, body, n)
        positions = [d for d, opts in enumerate(options) if identity[d] in opts and d != decision]
        if positions:
            depth = rng.integers(0, len(positions) + 1, size=n)
            ranks = np.argsort(np.argsort(rng.random((n, len(positions))), axis=1), axis=1)
            use = ranks < depth[:, None]
            cols = np.asarray(positions)
            ids = np.asarray([identity[d] for d in positions])
            archs[:, cols] = np.where(use, ids[None, :], archs[:, cols])
        archs[:, decision] = op
        return archs

    def score_ops(
        self, stats: AngleStats, net: nn.Module, rng: np.random.Generator, trainer: pl.Trainer | None = None
    ) -> dict[tuple[int, int], float]:
        """Mean path angle of every open op of every decision with more than one alive op (-inf: no feasible path).

        With ``trainer`` the sampled scoring shows a progress bar (rank zero, when the trainer shows progress).
        """
        options = alive_options(net)
        open_ops = [(d, o) for d, opts in enumerate(options) if len(opts) > 1 for o in opts]
        scores: dict[tuple[int, int], float] = {}
        found = decisions(net)
        gated = any(d.gate is not None for d in found)
        if math.prod(len(o) for o in options) <= self.exhaustive_below:
            archs = np.array(list(itertools.product(*options)), dtype=np.int64)
            if gated:  # one row per network: ops on unchosen inputs spelled one way
                archs = np.unique(canonical_archs(found, archs, options), axis=0)
            if self.constraint is not None:
                archs = archs[self.constraint.mask(archs)]
            angles = stats.path_angles(archs, self._weight_free()) if len(archs) else np.zeros(0)
            used = used_mask(found, archs) if len(archs) else np.zeros((0, len(found)), dtype=bool)
            for d, o in open_ops:
                hit = (archs[:, d] == o) & used[:, d] if len(archs) else np.zeros(0, dtype=bool)
                scores[(d, o)] = float(angles[hit].mean()) if hit.any() else -math.inf
            return scores
        # random depth is a chain-of-layers notion: a skip op on a DARTS input edge is not a skipped layer
        identity = [None if dec.gate is not None else i for dec, i in zip(found, identity_ops(net))]
        for d, o in open_ops if trainer is None else progress(open_ops, "ABS shrink step", trainer):
            archs = self.sample_paths(rng, options, d, o, 2 * self.paths_per_op, identity, found)
            if gated:
                archs = canonical_archs(found, archs, options)
            if self.constraint is not None:
                archs = archs[self.constraint.mask(archs)]
            if len(archs):
                archs = np.unique(archs, axis=0)
                archs = archs[rng.permutation(len(archs))[: self.paths_per_op]]
            scores[(d, o)] = float(stats.path_angles(archs, self._weight_free()).mean()) if len(archs) else -math.inf
        return scores

    def _weight_free(self) -> str:
        return getattr(self._tracker, "weight_free", "zero")

    def select_ops_to_drop(self, scores: dict[tuple[int, int], float], options: list[list[int]]) -> list[tuple[int, int]]:
        """ABS's global ranking: the lowest-angle ops first, never the last op of a decision.

        Scores are compared after rounding to ``tie_decimals`` decimals (differences below that are float noise,
        e.g. from another thread count); equal rounded scores are ordered by (decision, op) index, so the decision
        does not depend on noise below the tolerance.
        """
        remaining = [len(o) for o in options]
        drops: list[tuple[int, int]] = []
        for (d, o), _ in sorted(scores.items(), key=lambda item: (round(item[1], self.tie_decimals), item[0])):
            if len(drops) >= self.drop_per_step:
                break
            if remaining[d] > 1:
                drops.append((d, o))
                remaining[d] -= 1
        return drops

    # ---------------------------------------------------------------- the shrink step
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finished or not self.due(trainer.current_epoch):
            return
        net = supernet_of(pl_module)
        if space_size(net) <= self.space_threshold or (self.max_steps is not None and self.steps_done >= self.max_steps):
            self.finished = True
            return
        drops = None
        if trainer.is_global_zero:
            stats = self._tracker.compute_statistics(pl_module)
            rng = np.random.default_rng([self.seed, self.steps_done])
            scores = self.score_ops(stats, net, rng, trainer)
            drops = self.select_ops_to_drop(scores, alive_options(net))
        drops = trainer.strategy.broadcast(drops, src=0)
        found = decisions(net)
        for d, o in drops:
            set_alive(net, d, o, False)
        self.steps_done += 1
        self.dropped_total += len(drops)
        size = space_size(net)
        self.timeline.append({
            "epoch": trainer.current_epoch, "step": trainer.global_step, "space_size": size,
            "dropped": [[found[d].key, found[d].names[o]] for d, o in drops],
        })
        if size <= self.space_threshold or not drops or (self.max_steps is not None and self.steps_done >= self.max_steps):
            self.finished = True
        if (self.reset_reference_after is not None and not self.reset_done
                and self.dropped_total > self.reset_reference_after):
            self._tracker.reset_reference(pl_module)
            self.reset_done = True
        rank_zero_info(f"ProgressivePruner step {self.steps_done}: dropped {len(drops)} ops, space size {size:.3g}")
        self._report(trainer, net, size)

    def shrunk_space(self, net: nn.Module) -> dict[str, Any]:
        """The current space as JSON-ready data: alive op names per decision, size and the timeline."""
        return {
            "space_size": space_size(net), "steps": self.steps_done, "dropped_total": self.dropped_total,
            "alive": {d.key: [d.names[i] for i in d.alive] for d in decisions(net)}, "timeline": self.timeline,
        }

    def _report(self, trainer: pl.Trainer, net: nn.Module, size: int) -> None:
        folder = run_dir(trainer)  # a collective: every rank
        for logger in trainer.loggers:
            logger.log_metrics({"nas/space_size_log10": math.log10(size)}, step=trainer.global_step)
        if not trainer.is_global_zero:
            return
        atomic_write_text(json.dumps(self.shrunk_space(net), indent=2), folder / "shrunk_space.json")
        if trainer.loggers:
            log_image(trainer, "nas/shrink_timeline", self.timeline_figure())

    def timeline_figure(self) -> Any:
        """Space size (log10) after each shrink step."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(5, 3), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([t["epoch"] for t in self.timeline], [math.log10(t["space_size"]) for t in self.timeline], "o-")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (0-based, as in shrunk_space.json)")
        ax.set_ylabel("log10 |space|")
        ax.set_title("ABS shrinking")
        fig.tight_layout()
        return fig

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "dropped_total": self.dropped_total, "reset_done": self.reset_done,
                "finished": self.finished, "timeline": self.timeline, "drop_per_step": self.drop_per_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict["steps_done"])
        self.dropped_total = int(state_dict["dropped_total"])
        self.reset_done, self.finished = bool(state_dict["reset_done"]), bool(state_dict["finished"])
        self.timeline = list(state_dict["timeline"])
        self.drop_per_step = state_dict.get("drop_per_step", self.drop_per_step)
