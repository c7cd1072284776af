"""``EvolutionSearch``: SPOS's evolutionary search over a trained supernet, with a pluggable metric.

At the end of fit (or of ``validate`` on a saved checkpoint, ``run_on="validate"``) the callback runs
:class:`~lightning_nd.nas.evolution.Evolution` over the supernet's alive space, under optional FLOPs (MACs) and
parameter ranges, and scores candidates with one of:

* ``"angle"`` (RLNAS): the path angle from the :class:`~lightning_nd.callbacks.AngleTracker`'s statistics, one
  float64 pass and no data at all;
* ``"accuracy"`` (SPOS): validation accuracy of the path after BN recalibration on a fixed set of training batches
  (``SupernetModule.evaluate_arch``);
* ``"naswot"``: the NASWOT score of the path on one fixed training minibatch (meant for supernets at
  initialisation);
* any callable ``metric(pl_module, arch) -> float``, or its dotted import path (higher is better).

Under DDP every generation is split across ranks (rank r scores candidates r, r + world, ...), the scores are
all-gathered, so every rank holds the same search state; the data used for scoring is drawn from seeded RNGs, so a
split search scores exactly as a single process. The search state is saved atomically after every generation
(``<dirpath>/evolution_state.pt``); a rerun on the same supernet resumes it. At the end ``arch.json`` (best
architecture and top-k with scores, FLOPs and params; the ``"best"`` entry is what ``arch_from_json`` and
:class:`~lightning_nd.nas.subnet.Subnet` read) and an evolution-progress picture are written; on the ``nb201``
space the NAS-Bench-201 accuracy of the found cells is looked up and reported.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_nd.callbacks.angle_tracker import AngleTracker, supernet_of
from lightning_nd.nas.arch import alive_options, arch_to_json, canonical_arch, decisions, list_choices
from lightning_nd.nas.evolution import Evolution, progress_figure
from lightning_nd.nas.flops import ArchCost, CostConstraint
from lightning_nd.utils import atomic_save, atomic_write_text, log_image, progress, run_dir

METRICS = ("angle", "accuracy", "naswot")
MetricFn = Callable[[pl.LightningModule, list[int]], float]


class SeededBatches:
    """The first ``num_batches`` batches of ``make_loader()``, identical on every iteration, rank and rerun.

    Every batch is fetched under a torch RNG seeded with ``seed + i`` (the loader's shuffling is drawn at the first
    fetch, augmentation per batch), so the batches depend on ``seed`` alone; the global RNG is left untouched.
    """

    def __init__(self, make_loader: Callable[[], Any], num_batches: int | None, seed: int) -> None:
        self.make_loader, self.num_batches, self.seed = make_loader, num_batches, seed

    def __iter__(self) -> Any:
        iterator = None
        i = 0
        while self.num_batches is None or i < self.num_batches:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + i)
                if iterator is None:
                    iterator = iter(self.make_loader())
                batch = next(iterator, None)
            if batch is None:
                return
            yield batch
            i += 1


def fixed_batches(make_loader: Callable[[], Any], num_batches: int | None, seed: int, cache: bool = True) -> Any:
    """:class:`SeededBatches`, kept in memory when ``cache`` (fast for small data; re-read identically otherwise)."""
    batches = SeededBatches(make_loader, num_batches, seed)
    return list(batches) if cache else batches


def reinitialised(net: nn.Module, seed: int) -> nn.Module:
    """A copy of ``net`` with every module's ``reset_parameters`` run under a torch RNG seeded by ``seed``."""
    copy_ = copy.deepcopy(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in copy_.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return copy_


def _resolve(metric: str | MetricFn) -> str | MetricFn:
    if callable(metric) or metric in METRICS:
        return metric
    if isinstance(metric, str) and "." in metric:
        module, _, name = metric.rpartition(".")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise MisconfigurationException(f"metric={metric!r}: cannot import it ({err})") from err
        if callable(fn):
            return fn
    raise MisconfigurationException(
        f"metric={metric!r} is not supported; allowed: {', '.join(map(repr, METRICS))}, a callable "
        "(pl_module, arch) -> float, or its dotted import path"
    )


class EvolutionSearch(Callback):
    """Search the supernet's space with SPOS's evolutionary algorithm and write ``arch.json``.

    Args:
        metric: ``"angle"`` (needs an ``AngleTracker`` callback), ``"accuracy"`` (needs ``evaluate_arch``, as
            ``SupernetModule`` has), ``"naswot"``, a callable ``(pl_module, arch) -> float`` or its import path.
        population, top_k, mutations, mutation_prob, crossovers, generations: the EA (SPOS defaults 50, 10, 25,
            0.1, 25, 20).
        seed: seed of the search and of the scoring data (``None``: ``torch.initial_seed()``, i.e.
            ``seed_everything``'s, broadcast from rank 0 at setup).
        tie_decimals: scores are ranked rounded to this many decimals, ties broken by the architecture encoding
            (see :class:`~lightning_nd.nas.evolution.Evolution`), so noise below it cannot change the pick.
        flops_range: ``(low, high)`` MACs a candidate must satisfy (``None`` = open end), e.g. ``[null, 330e6]``.
        params_range: ``(low, high)`` parameter count a candidate must satisfy.
        input_shape: ``(C, H, W)`` for FLOPs (default: the datamodule's ``input_shape``).
        calib_batches: training batches for BN recalibration before each ``accuracy`` evaluation.
        val_batches: validation batches per ``accuracy`` evaluation (``None``: the whole validation set).
        naswot_batch_size: samples of the fixed NASWOT minibatch (paper: 128 for v2, 256 for v1).
        naswot_version: 2 (Hamming kernel) or 1 (Jacobian).
        naswot_weights: ``"init"`` scores each path on a copy of the supernet re-initialised from ``seed`` (the
            paper's protocol: NASWOT judges untrained networks); ``"trained"`` on the supernet's current weights.
        run_on: ``"fit_end"``, or ``"validate"`` to search a saved checkpoint with ``trainer.validate``
            (the ``AngleTracker``'s reference weights are then read from the checkpoint's callback states).
        dirpath: output folder (default: the run directory).
        filename: name of the architecture file.
        resume: continue a saved search state of the same supernet weights and search settings (metric and its
            settings, EA settings and seed, cost ranges, space; see :meth:`search_key`); a state saved with other
            settings is not reused: the search starts afresh with a warning naming what differs.
        benchmark_dataset: NAS-Bench-201 dataset reported for ``nb201`` spaces (the others are in ``arch.json``).
        cache_data: keep the fixed calibration / validation batches in memory (fast for small data); ``False``
            re-reads the same batches for every candidate (ImageNet-sized data).

    Raises:
        MisconfigurationException: for an unknown metric or ``run_on``, a bad EA setting, ``calib_batches < 0``,
            ``naswot_version`` not 1 or 2, or at setup for ``"angle"`` without an ``AngleTracker``, ``"accuracy"``
            on a module without ``evaluate_arch`` or a metric that needs data without a datamodule; at fit start
            under DDP without ``find_unused_parameters`` (a supernet trains one path per step).
        ValueError: at setup for a model without ``Choice`` layers; from ``Evolution`` when no architecture fits
            the constraints.
        RuntimeError: when ``"naswot"`` gives every distinct candidate of the first generation the same score (no
            ReLU in the candidate ops: the pick would be a tie-break).

    Example::

        trainer = Trainer(callbacks=[AngleTracker(preset="rlnas_nb201"),
                                     EvolutionSearch(metric="angle", flops_range=(None, 330e6))])
        trainer.fit(SupernetModule("nb201"), datamodule=RandomLabels(FashionMNISTDataModule(image_size=32, channels=3)))
        # -> <run dir>/arch.json, <run dir>/media/nas_evolution_*.png
    """

    def __init__(
        self,
        metric: str | MetricFn = "angle",
        population: int = 50,
        top_k: int = 10,
        mutations: int = 25,
        mutation_prob: float = 0.1,
        crossovers: int = 25,
        generations: int = 20,
        seed: int | None = None,
        tie_decimals: int | None = 6,
        flops_range: tuple[float | None, float | None] | None = None,
        params_range: tuple[float | None, float | None] | None = None,
        input_shape: tuple[int, int, int] | None = None,
        calib_batches: int = 20,
        val_batches: int | None = None,
        naswot_batch_size: int = 128,
        naswot_version: int = 2,
        naswot_weights: Literal["init", "trained"] = "init",
        run_on: Literal["fit_end", "validate"] = "fit_end",
        dirpath: str | None = None,
        filename: str = "arch.json",
        resume: bool = True,
        benchmark_dataset: str = "cifar10",
        cache_data: bool = True,
    ) -> None:
        self.metric = _resolve(metric)
        if run_on not in ("fit_end", "validate"):
            raise MisconfigurationException(f"run_on={run_on!r} is not supported; allowed: 'fit_end', 'validate'")
        if calib_batches < 0 or (val_batches is not None and val_batches < 1) or naswot_batch_size < 2:
            raise MisconfigurationException(
                f"calib_batches={calib_batches} must be >= 0, val_batches={val_batches} >= 1 or None, "
                f"naswot_batch_size={naswot_batch_size} >= 2"
            )
        if naswot_version not in (1, 2):
            raise MisconfigurationException(f"naswot_version={naswot_version} is not supported; allowed: 1, 2")
        if naswot_weights not in ("init", "trained"):
            raise MisconfigurationException(f"naswot_weights={naswot_weights!r} is not supported; allowed: 'init', 'trained'")
        self.naswot_weights = naswot_weights
        self.ea_kwargs = {
            "population": population, "top_k": top_k, "mutations": mutations, "mutation_prob": mutation_prob,
            "crossovers": crossovers, "generations": generations, "seed": seed or 0, "tie_decimals": tie_decimals,
        }
        try:
            Evolution([[0]], **self.ea_kwargs)  # validates the EA settings now, not at the end of a long fit
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self._seed_arg, self.seed = seed, seed or 0
        self.flops_range, self.params_range, self.input_shape = flops_range, params_range, input_shape
        self.calib_batches, self.val_batches = calib_batches, val_batches
        self.naswot_batch_size, self.naswot_version = naswot_batch_size, naswot_version
        self.run_on, self.dirpath, self.filename, self.resume = run_on, dirpath, filename, resume
        self.benchmark_dataset, self.cache_data = benchmark_dataset, cache_data
        self.evolution: Evolution | None = None
        self.result: dict[str, Any] | None = None
        self._saved_state: dict[str, Any] | None = None

    @property
    def metric_name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "callable")

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._seed_arg is None:
            self.seed = int(trainer.strategy.broadcast(torch.initial_seed() % 2**31, src=0))  # every rank runs setup
            self.ea_kwargs["seed"] = self.seed
        if not list_choices(supernet_of(pl_module)):
            raise ValueError(f"EvolutionSearch needs a supernet with Choice layers; {type(pl_module).__name__} has none")
        if self.metric == "angle" and self._tracker(trainer) is None:
            raise MisconfigurationException("EvolutionSearch(metric='angle') needs an AngleTracker in the callbacks")
        if self.metric == "accuracy" and not callable(getattr(pl_module, "evaluate_arch", None)):
            raise MisconfigurationException(
                f"EvolutionSearch(metric='accuracy') needs a module with evaluate_arch (e.g. SupernetModule); "
                f"{type(pl_module).__name__} has none"
            )
        if self.metric in ("accuracy", "naswot") and trainer.datamodule is None:
            raise MisconfigurationException(f"EvolutionSearch(metric={self.metric!r}) needs a datamodule")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A supernet trains one path per step: the other candidates get no gradient, which plain DDP rejects only
        # after the first step with a generic message (after spawning, for ddp_spawn). Say what to use now.
        model = trainer.strategy.model
        if (isinstance(model, DistributedDataParallel) and not model.find_unused_parameters
                and trainer.max_epochs != 0 and trainer.max_steps != 0):
            raise MisconfigurationException(
                f"EvolutionSearch: {type(pl_module).__name__} is a supernet trained one path per step, so the "
                "unsampled candidates get no gradient and DDP without find_unused_parameters fails. Use "
                "strategy='ddp_find_unused_parameters_true' or 'ddp_spawn_find_unused_parameters_true' (or "
                "DDPStrategy(find_unused_parameters=True)). After a ddp_spawn fit, read the result from arch.json: "
                "the callbacks of the launching process are not updated."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on == "fit_end":
            self.search(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on == "validate" and trainer.state.fn == TrainerFn.VALIDATING:
            self.search(trainer, pl_module)

    # ---------------------------------------------------------------- the search
    def search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run (or resume) the search now; a collective under DDP: call it on every rank.

        Returns:
            The ``arch.json`` content (identical on every rank).
        """
        start = time.perf_counter()
        net = supernet_of(pl_module)
        active = [c.active for c in list_choices(net)]
        folder = Path(self.dirpath) if self.dirpath is not None else run_dir(trainer)
        shape = self._shape(trainer, net)
        cost = ArchCost(net, shape) if shape is not None else None
        if cost is None:
            rank_zero_warn(
                f"EvolutionSearch: no input shape is known (the datamodule has no input_shape and the network no "
                f"input_size/in_chans), so {self.filename} gets flops and params null; pass input_shape=(C, H, W)"
            )
        constraint = None
        if self.flops_range is not None or self.params_range is not None:
            if cost is None:
                raise MisconfigurationException("flops_range/params_range need input_shape or a datamodule with one")
            constraint = CostConstraint(cost, self.flops_range, self.params_range)
        score_many = self._scorer(trainer, pl_module)
        settings = dict(self.ea_kwargs)
        if trainer.fast_dev_run:  # a bug-finding run: one generation checks the whole search path
            settings["generations"] = 1
        found = decisions(net)  # input-choice spaces: one spelling per network, so no draw is wasted on a duplicate
        canonical = (lambda arch: canonical_arch(found, arch)) if any(d.gate is not None for d in found) else None
        evolution = Evolution(alive_options(net), constraint=constraint, canonical=canonical, **settings)
        fingerprint = self._fingerprint(net)
        key = self.search_key(trainer, net, shape, settings)
        self._restore(trainer, evolution, folder, fingerprint, key)
        self.evolution = evolution
        state_file = folder / "evolution_state.pt"
        bar = progress(
            range(evolution.generations - evolution.generation), f"EvolutionSearch ({self.metric_name})", trainer
        )
        try:
            for _ in bar:
                if evolution.done:
                    break
                candidates = evolution.ask()
                if not candidates:
                    break
                scores = self._split_scores(trainer, candidates, score_many)
                if evolution.generation == 0:
                    self._check_spread(candidates, scores)
                evolution.tell(candidates, scores)
                self._saved_state = {"fingerprint": fingerprint, "key": key, "evolution": evolution.state_dict()}
                if trainer.is_global_zero:
                    atomic_save(self._saved_state, state_file)
                last = evolution.history[-1]
                for logger in trainer.loggers:
                    logger.log_metrics(
                        {"search/best": last["best"], "search/topk_mean": last["topk_mean"]}, step=last["generation"]
                    )
        finally:
            bar.close()
            for choice, index in zip(list_choices(net), active):
                choice.active = index
        result = self._result(net, evolution, cost)
        result["seconds"] = time.perf_counter() - start  # wall time of this call (rank 0's)
        result = trainer.strategy.broadcast(result, src=0)
        self.result = result
        if trainer.is_global_zero:
            atomic_write_text(json.dumps(result, indent=2), folder / self.filename)
        log_image(trainer, "nas/evolution", progress_figure(evolution.history, self.metric_name))
        best = result["best"]
        note = ""
        if "nb201" in best:
            d = self.benchmark_dataset
            note = (f", NAS-Bench-201 {d} {best['nb201'][d]:.2f}% (better than {best['nb201']['percentile'][d]:.1f}% "
                    f"of the 15,625 cells; {best['nb201']['arch_str']})")
        rank_zero_info(f"EvolutionSearch ({self.metric_name}): best {best['ops']} score {best['score']:.6g}{note}")
        if "nb201" in best:
            for logger in trainer.loggers:
                logger.log_metrics({f"search/nb201_{self.benchmark_dataset}": best["nb201"][self.benchmark_dataset]})
        return result

    def _check_spread(self, candidates: list[list[int]], scores: list[float]) -> None:
        """Equal scores for every distinct candidate of the first generation: the metric cannot rank this space.

        The search would then pick by the tie rule alone. For NASWOT this means its kernel does not depend on the
        path (e.g. no ReLU inside the candidate ops): an error. For other metrics, a warning.
        """
        distinct = {tuple(a) for a in candidates}
        if len(distinct) < 2 or len({round(s, 12) if math.isfinite(s) else str(s) for s in scores}) > 1:
            return
        message = (
            f"EvolutionSearch ({self.metric_name}): all {len(distinct)} distinct candidates of the first generation "
            f"scored {scores[0]!r}; the metric does not tell these paths apart, so the pick would be a tie-break"
        )
        if self.metric == "naswot":
            raise RuntimeError(
                message + ". NASWOT reads the ReLUs of the path: the candidate ops hold no ReLU (nn.ReLU-family module "
                "or F.relu / torch.relu call) whose input depends on the choice"
            )
        rank_zero_warn(message)

    def _split_scores(self, trainer: pl.Trainer, candidates: list[list[int]], score_many: Any) -> list[float]:
        world, rank = trainer.world_size, trainer.global_rank
        mine = candidates[rank::world]
        local = [float(s) for s in score_many(mine)] if mine else []
        if world == 1:
            return local
        per_rank = math.ceil(len(candidates) / world)
        device = trainer.strategy.root_device
        padded = torch.full((per_rank,), float("nan"), dtype=torch.float64, device=device)
        if local:
            padded[: len(local)] = torch.tensor(local, dtype=torch.float64, device=device)
        gathered = trainer.strategy.all_gather(padded).reshape(world, per_rank).cpu()
        return [float(gathered[i % world, i // world]) for i in range(len(candidates))]

    # ---------------------------------------------------------------- metrics
    def _tracker(self, trainer: pl.Trainer) -> AngleTracker | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, AngleTracker)), None)

    def _scorer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[list[list[int]]], list[float]]:
        if self.metric == "angle":
            tracker = self._tracker(trainer)
            if tracker is None:
                raise MisconfigurationException("EvolutionSearch(metric='angle') needs an AngleTracker in the callbacks")
            if tracker.reference is None:
                self._load_tracker_from_checkpoint(trainer, tracker)
            tracker.compute_statistics(pl_module)
            return lambda archs: tracker.path_angles(archs).tolist()
        if self.metric == "accuracy":
            dm = self._datamodule(trainer)
            calib = fixed_batches(dm.train_dataloader, self.calib_batches, self.seed, self.cache_data)
            val = fixed_batches(dm.val_dataloader, self.val_batches, self.seed, self.cache_data)
            return lambda archs: [
                pl_module.evaluate_arch(a, calib, val, calib_batches=self.calib_batches, sync=False) for a in archs
            ]
        if self.metric == "naswot":
            from lightning_nd.nas.naswot import naswot_score

            dm = self._datamodule(trainer)
            batches = fixed_batches(dm.train_dataloader, self._batches_for(dm), self.seed)
            x = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])[: self.naswot_batch_size]
            net = supernet_of(pl_module)
            if self.naswot_weights == "init":
                with torch.inference_mode(False):  # a copy made under validate's inference mode cannot train
                    net = reinitialised(net, self.seed)

            def score_naswot(archs: list[list[int]]) -> list[float]:
                # validate runs under inference mode: its tensors cannot enter autograd (v1) nor be hooked as
                # versioned tensors (v2), so score outside it with grad on, on a normal copy of the batch
                with torch.inference_mode(False), torch.enable_grad():
                    batch = x.clone().to(next(net.parameters()).device)
                    return [naswot_score(net, batch, self.naswot_version, arch=a) for a in archs]

            return score_naswot
        metric = self.metric
        return lambda archs: [float(metric(pl_module, list(a))) for a in archs]

    def _batches_for(self, dm: Any) -> int:
        size = int(getattr(dm, "batch_size", 0) or 1)
        return max(1, math.ceil(self.naswot_batch_size / size))

    def _datamodule(self, trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule
        if dm is None:
            raise MisconfigurationException(f"EvolutionSearch(metric={self.metric!r}) needs a datamodule")
        inner = getattr(dm, "datamodule", dm)
        if getattr(inner, "train_dataset", True) is None:  # validate/test stages may not have built the train split
            dm.setup("fit")
        return dm

    def _load_tracker_from_checkpoint(self, trainer: pl.Trainer, tracker: AngleTracker) -> None:
        path = trainer.ckpt_path
        if path is None:
            raise RuntimeError(
                "AngleTracker has no reference weights: run the search at the end of fit, or validate a checkpoint "
                "written by a run that had the AngleTracker (pass ckpt_path)"
            )
        states = torch.load(path, map_location="cpu", weights_only=False).get("callbacks", {})
        state = states.get(tracker.state_key)
        if state is None:
            raise RuntimeError(f"checkpoint {path!r} has no state for {tracker.state_key!r}: it was not saved with it")
        tracker.load_state_dict(state)

    # ---------------------------------------------------------------- state and results
    def _shape(self, trainer: pl.Trainer, net: nn.Module) -> tuple[int, ...] | None:
        if self.input_shape is not None:
            return tuple(self.input_shape)
        shape = getattr(trainer.datamodule, "input_shape", None) if trainer.datamodule is not None else None
        if shape is not None:
            return tuple(shape)
        size, chans = getattr(net, "input_size", None), getattr(net, "in_chans", None)
        return (chans, size, size) if size and chans else None

    @staticmethod
    @torch.no_grad()
    def _fingerprint(net: nn.Module) -> str:
        total = sum(float(p.double().sum()) + 1e-3 * float(p.double().abs().sum()) for p in net.parameters())
        return f"{sum(p.numel() for p in net.parameters())}:{total:.10e}"

    def search_key(
        self, trainer: pl.Trainer, net: nn.Module, shape: tuple[int, ...] | None, settings: dict[str, Any]
    ) -> dict[str, Any]:
        """Everything that defines this search besides the weights: a saved state is resumed only when it matches.

        The metric (a callable by its import path), the EA settings and seed, the FLOPs/params ranges and the input
        shape they are measured on, the space (alive ops), and the metric's own settings (data batches, NASWOT
        version, batch and weights, the AngleTracker's configuration).
        """
        metric = self.metric
        if not isinstance(metric, str):
            owner = metric if isinstance(metric, type) or callable(getattr(metric, "__code__", None)) else type(metric)
            metric = f"{getattr(owner, '__module__', '?')}.{getattr(owner, '__qualname__', self.metric_name)}"
        key: dict[str, Any] = {
            "metric": metric, "ea": settings, "flops_range": self.flops_range, "params_range": self.params_range,
            "input_shape": shape if (self.flops_range or self.params_range) else None,
            "space": alive_options(net),
        }
        if self.metric == "accuracy":
            key.update(calib_batches=self.calib_batches, val_batches=self.val_batches)
        if self.metric == "naswot":
            key.update(naswot_batch_size=self.naswot_batch_size, naswot_version=self.naswot_version,
                       naswot_weights=self.naswot_weights)
        if self.metric == "angle":
            tracker = self._tracker(trainer)
            key["angle_tracker"] = {name: repr(getattr(tracker, name, None)) for name in ("vector", "weight_free")}
        return json.loads(json.dumps(key, default=str))  # tuples and lists compare equal, as after a reload

    def _restore(
        self, trainer: pl.Trainer, evolution: Evolution, folder: Path, fingerprint: str, key: dict[str, Any]
    ) -> None:
        if not self.resume:
            return
        state = self._saved_state
        if state is None and trainer.is_global_zero and (folder / "evolution_state.pt").is_file():
            state = torch.load(folder / "evolution_state.pt", map_location="cpu", weights_only=False)
        state = trainer.strategy.broadcast(state, src=0)
        if state is None:
            return
        if state.get("fingerprint") != fingerprint:
            rank_zero_warn("EvolutionSearch: the saved search state belongs to other supernet weights; starting anew")
            return
        saved_key = state.get("key") or {}
        if saved_key != key:
            differ = sorted(k for k in set(saved_key) | set(key) if saved_key.get(k) != key.get(k))
            rank_zero_warn(
                f"EvolutionSearch: the saved search state in {folder} was made with other settings "
                f"({', '.join(f'{k}: {saved_key.get(k)!r} -> {key.get(k)!r}' for k in differ)}); starting anew "
                f"and overwriting it (resume=False skips this check; another dirpath keeps both)"
            )
            return
        try:
            evolution.load_state_dict(state["evolution"])
        except ValueError as err:
            rank_zero_warn(f"EvolutionSearch: not resuming the saved search state: {err}")
            return
        rank_zero_info(f"EvolutionSearch: resumed after generation {evolution.generation}")

    def _entry(self, net: nn.Module, arch: list[int], score: float, cost: ArchCost | None) -> dict[str, Any]:
        entry = arch_to_json(net, arch, score=score)
        entry["flops"] = None if cost is None else cost.flops(arch)
        entry["params"] = None if cost is None else cost.params(arch)
        from lightning_nd.nas.spaces.nb201 import NB201Supernet

        if isinstance(net, NB201Supernet):
            from lightning_nd.nas.bench import NB201

            bench = NB201()
            entry["nb201"] = {"arch_str": bench.arch_str(bench.index(arch))}
            entry["nb201"].update({d: bench.accuracy(arch, d) for d in NB201.datasets})
            # share of the 15,625 cells that are strictly worse, in percent
            entry["nb201"]["percentile"] = {
                d: float(100.0 * np.mean(bench.accuracies(d) < entry["nb201"][d])) for d in NB201.datasets
            }
        return entry

    def _result(self, net: nn.Module, evolution: Evolution, cost: ArchCost | None) -> dict[str, Any]:
        top = [self._entry(net, a, s, cost) for a, s in evolution.top(evolution.top_k)]
        return {
            "metric": self.metric_name,
            "best": top[0],
            "top_k": top,
            "generations": evolution.generation,
            "evaluated": len(evolution.records),
            "history": [{k: h[k] for k in ("generation", "best", "topk_mean")} for h in evolution.history],
            "settings": {**self.ea_kwargs, "flops_range": self.flops_range, "params_range": self.params_range},
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"saved_state": self._saved_state, "result": self.result}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_state = state_dict.get("saved_state")
        self.result = state_dict.get("result")
