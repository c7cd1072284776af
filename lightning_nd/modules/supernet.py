"""``SupernetModule``: Single-Path-One-Shot training of a supernet, one synchronised path per optimizer step.

Before every training batch the :class:`~lightning_nd.nas.PathSampler` draws the path of the current optimizer
step from ``(seed, trainer.global_step)``: every micro-batch of a gradient-accumulation window shares the path
(SPOS: one path per optimizer step), every DDP rank draws the same path without communication, and a resumed run
continues the sequence. Candidates that were not sampled receive no gradient and keep ``grad=None``, so momentum
and weight decay do not move them; with ``zero_grads_to_none`` all-zero gradients (ops whose output was unused)
are turned into ``None`` too, as SPOS/ABS do.

Under DDP the unused candidates need ``strategy="ddp_find_unused_parameters_true"`` (or
``DDPStrategy(find_unused_parameters=True)``); plain DDP is rejected at fit start with that hint. Validation runs
one architecture per epoch (``val_arch``, else a random one seeded by the epoch) after resetting and
recalibrating the BN statistics on training batches; the training statistics are restored afterwards.
"""

from __future__ import annotations

import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_nd.modules.classifier import ImageClassifier, check_against_data
from lightning_nd.nas.arch import activate, arch_from_json, check_arch, decisions, get_arch, list_choices, set_arch
from lightning_nd.nas.bn import bn_state, load_bn_state, recalibrate_bn
from lightning_nd.nas.flops import ArchCost, CostConstraint
from lightning_nd.nas.sampler import PathSampler
from lightning_nd.nas.spaces import build_space
from lightning_nd.utils import progress


class SupernetModule(ImageClassifier):
    """Train a one-shot supernet with uniformly sampled, rank-synchronised single paths (SPOS).

    Args:
        supernet: a network with ``Choice`` layers, or a space name for :func:`~lightning_nd.nas.build_space`.
            ``"nb201"`` builds the official one-shot supernet, without BN affine parameters inside the cells
            (ABS/RLNAS; with affine cells the angle ranks NB201 cells backwards, Kendall tau -0.46 in
            ``benchmarks/results/nas_ranking_ablation.md``) unless ``space_kwargs`` sets ``affine``; standalone
            builds (``build_space``, ``Subnet``, ``NB201.build``) keep the benchmark's affine BNs.
        num_classes: classes of the task.
        in_chans: input channels (for a space built by name).
        input_size: input side, for a space built by name and for FLOPs constraints (default: the datamodule's).
        space_kwargs: extra arguments of the space (e.g. ``{"C": 4, "N": 1}``).
        seed: sampler seed shared by all ranks (``None``: ``torch.initial_seed()``, i.e. ``seed_everything``'s,
            broadcast from rank 0 at setup).
        flops_range: optional ``(low, high)`` MACs every trained path must satisfy (rejection sampling).
        params_range: optional ``(low, high)`` parameter count every trained path must satisfy.
        flops_bins: SPOS FLOPs-bin sampling: ``[(low, high), ...]`` MACs; one bin per step, uniformly.
        check_sync: debug switch: all-gather a hash of every path and fail when the ranks disagree.
        zero_grads_to_none: set all-zero gradients to ``None`` before each optimizer step (SPOS/ABS).
        val_arch: architecture validated each epoch (list of indices or an ``arch.json`` path); default a random
            path per epoch.
        calib_batches: training batches for BN recalibration before validation (0 = use training statistics).
        label_smoothing, optimizer, lr_scheduler: see :class:`~lightning_nd.modules.ImageClassifier`.
        lr_interval: step the ``lr_scheduler`` every ``"epoch"`` or every optimizer ``"step"`` (SPOS's linear
            per-iteration decay: ``LinearLR(start_factor=1, end_factor=0, total_iters=max_steps)``).

    Raises:
        ValueError: for a model without ``Choice`` layers, an unknown space, ``calib_batches < 0``, or a
            ``val_arch`` that does not fit the space.
        MisconfigurationException: at fit start under DDP without ``find_unused_parameters=True``.

    Example::

        model = SupernetModule("nb201", num_classes=10, space_kwargs={"C": 8, "N": 2})
        trainer = Trainer(strategy="ddp_find_unused_parameters_true", callbacks=[AngleTracker()])
        trainer.fit(model, datamodule=DigitsDataModule(image_size=32, channels=3))
        model.evaluate_arch([3, 3, 3, 3, 3, 3], dm.train_dataloader(), dm.val_dataloader())
    """

    def __init__(
        self,
        supernet: nn.Module | str = "nb201",
        num_classes: int = 10,
        in_chans: int = 3,
        input_size: int | None = None,
        space_kwargs: dict[str, Any] | None = None,
        seed: int | None = None,
        flops_range: tuple[float | None, float | None] | None = None,
        params_range: tuple[float | None, float | None] | None = None,
        flops_bins: list[tuple[float, float]] | None = None,
        check_sync: bool = False,
        zero_grads_to_none: bool = True,
        val_arch: list[int] | str | None = None,
        calib_batches: int = 20,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_interval: str = "epoch",
    ) -> None:
        if calib_batches < 0:
            raise ValueError(f"calib_batches={calib_batches} must be >= 0")
        if lr_interval not in ("epoch", "step"):
            raise ValueError(f"lr_interval={lr_interval!r} is not supported; allowed: 'epoch', 'step'")
        self.lr_interval = lr_interval
        net = supernet
        if isinstance(supernet, str):
            kwargs = dict(space_kwargs or {})
            kwargs.setdefault("num_classes", num_classes)
            kwargs.setdefault("in_chans", in_chans)
            if input_size is not None:
                kwargs.setdefault("input_size", input_size)
            if supernet == "nb201":
                kwargs.setdefault("affine", False)  # the one-shot supernet (see Args)
            net = build_space(supernet, **kwargs)
        with warnings.catch_warnings():  # a module-valued `supernet` is saved with the weights, not as a hparam
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            super().__init__(net, num_classes, in_chans, label_smoothing, optimizer, lr_scheduler)
        if isinstance(supernet, nn.Module):
            self.save_hyperparameters(ignore=["supernet", "optimizer", "lr_scheduler"])
        self._seed_given = seed is not None
        seed = torch.initial_seed() % 2**63 if seed is None else seed
        self.sampler = PathSampler(self.net, seed=seed)  # raises for a model without Choice layers
        self.input_size = input_size
        self.flops_range, self.params_range, self.flops_bins = flops_range, params_range, flops_bins
        self.check_sync, self.zero_grads_to_none, self.calib_batches = check_sync, zero_grads_to_none, calib_batches
        self.val_arch = arch_from_json(self.net, val_arch) if isinstance(val_arch, (str, Path)) else val_arch
        if self.val_arch is not None:
            check_arch(self.net, list(self.val_arch), allow_dead=True)
        # listed once: the per-step hooks touch only these (no module walk per step)
        self._decisions = decisions(self.net)
        self._candidate_params = list(
            {id(p): p for d in self._decisions for layer in d.layers for p in layer.candidates.parameters()}.values()
        )
        self.current_arch: list[int] = self.sampler.sample(0)
        set_arch(self.net, self.current_arch)
        self._train_bn: list | None = None
        self._train_arch: list[int] = list(self.current_arch)

    def _input_shape(self) -> tuple[int, ...] | None:
        trainer = self._attached_trainer()
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        shape = getattr(datamodule, "input_shape", None)
        if shape is not None:
            return tuple(shape)
        size = self.input_size or getattr(self.net, "input_size", None)
        return (self.hparams.in_chans, size, size) if size else None

    def _attached_trainer(self) -> Any:
        try:
            return self.trainer
        except RuntimeError:
            return None

    @override
    def setup(self, stage: str) -> None:
        if not self._seed_given and self.trainer.world_size > 1:
            self.sampler.seed = int(self.trainer.strategy.broadcast(self.sampler.seed, src=0))  # every rank runs setup
        set_arch(self.net, self.current_arch, allow_dead=True)
        check_against_data(self, self.net, self.num_classes)
        if self.flops_range or self.params_range or self.flops_bins:
            shape = self._input_shape()
            if shape is None:
                raise ValueError("FLOPs/params constraints need input_size or a datamodule with input_shape")
            cost = ArchCost(self.net, shape)
            constraint = CostConstraint(cost, self.flops_range, self.params_range)
            self.sampler.cost, self.sampler.flops_bins = cost, [tuple(b) for b in (self.flops_bins or [])]
            self.sampler.constraint = constraint if (self.flops_range or self.params_range) else None

    @override
    def on_fit_start(self) -> None:
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise MisconfigurationException(
                "SupernetModule trains one path per step, so the unsampled candidates get no gradient and plain DDP "
                "fails. Use strategy='ddp_find_unused_parameters_true' (or 'ddp_spawn_find_unused_parameters_true', "
                "or DDPStrategy(find_unused_parameters=True)); static_graph=True is not usable."
            )

    @override
    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        if isinstance(config, dict) and isinstance(config.get("lr_scheduler"), dict):
            config["lr_scheduler"]["interval"] = self.lr_interval
        return config

    # ---------------------------------------------------------------- training
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        arch = self.sampler.sample(self.trainer.global_step)
        if self.check_sync:
            self.sampler.verify_synced(arch, self.trainer.strategy)
        activate(self._decisions, arch)  # drawn from the alive options: valid by construction
        self.current_arch = arch

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn all-zero gradients of candidate ops into ``None`` (SPOS/ABS ``sum(|grad|) == 0``).

        Only parameters of ``Choice`` candidates are checked (unsampled ones normally have ``grad=None`` already;
        all-zero ones appear with ``zero_grad(set_to_none=False)`` or when an op's output is unused), with one
        fused norm and one host transfer per step.
        """
        if not self.zero_grads_to_none:
            return
        params = [p for p in self._candidate_params if p.grad is not None]
        if not params:
            return
        for p, is_zero in zip(params, _all_zero([p.grad for p in params])):
            if is_zero:
                p.grad = None

    # ---------------------------------------------------------------- validation
    def _calibration_batches(self, epoch: int) -> Any:
        """Training samples for BN recalibration, from a loader of their own (single process, shuffled by a
        generator seeded with ``(seed, epoch)``): iterating the live training loader would restart its iterator
        (with persistent workers mid-epoch: some batches trained twice, others never) and draw from its RNG."""
        trainer = self.trainer
        loader = trainer.train_dataloader
        # Before training starts (sanity check) or in validate(), take the training set from the datamodule rather
        # than calling its train_dataloader(): that would build a loader (workers) and draw from the global RNG.
        dataset = loader.dataset if loader is not None else getattr(trainer.datamodule, "train_dataset", None)
        if dataset is None:
            loader = trainer.val_dataloaders
            return loader[0] if isinstance(loader, (list, tuple)) else loader
        batch_size = loader.batch_size if loader is not None else getattr(trainer.datamodule, "batch_size", 1)
        collate_fn = loader.collate_fn if loader is not None else getattr(trainer.datamodule, "collate_fn", None)
        generator = torch.Generator().manual_seed(int(self.sampler.rng(epoch, salt=2).integers(2**62)))
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate_fn)

    def validation_arch(self, epoch: int) -> list[int]:
        """The architecture validated at ``epoch``: ``val_arch``, else a path seeded by ``(seed, epoch)``."""
        if self.val_arch is not None:
            return list(self.val_arch)
        return self.sampler.sample(epoch, salt=1)

    @override
    def on_validation_epoch_start(self) -> None:
        arch = self.validation_arch(self.current_epoch)
        self._train_bn = bn_state(self.net)
        self._train_arch = get_arch(self.net)
        set_arch(self.net, arch, allow_dead=True)
        if self.calib_batches > 0:
            n = self.calib_batches
            batches = progress(
                islice(self._calibration_batches(self.current_epoch), n), "BN recalibration", self.trainer, total=n
            )
            with torch.inference_mode(False), torch.no_grad():
                recalibrate_bn(self.net, batches, n, strategy=self.trainer.strategy)

    @override
    def on_validation_epoch_end(self) -> None:
        if self._train_bn is not None:
            load_bn_state(self.net, self._train_bn)
            set_arch(self.net, self._train_arch, allow_dead=True)
            self._train_bn = None

    @torch.no_grad()
    def evaluate_arch(
        self,
        arch: list[int],
        calib_loader: Any,
        val_loader: Any,
        calib_batches: int = 20,
        val_batches: int | None = None,
        sync: bool = False,
    ) -> float:
        """Top-1 accuracy in [0, 1] of ``arch`` after BN recalibration; restores the BN statistics, path and mode.

        Args:
            arch: the architecture.
            calib_loader: training batches for BN recalibration (``calib_batches`` of them; 0 = no recalibration).
            val_loader: evaluation batches (all, or the first ``val_batches``).
            sync: all-reduce the BN statistics and the counts across ranks (a collective; every rank must
                evaluate the same ``arch``). Leave False when ranks evaluate different architectures.
        """
        net = self.net
        saved_bn, saved_active, mode = bn_state(net), [c.active for c in list_choices(net)], net.training
        trainer = self._attached_trainer()
        strategy = trainer.strategy if sync and trainer is not None else None
        device = next(net.parameters()).device
        try:
            set_arch(net, list(arch), allow_dead=True)
            if calib_batches > 0:
                with torch.inference_mode(False):
                    recalibrate_bn(net, calib_loader, calib_batches, strategy=strategy)
            net.eval()
            counts = torch.zeros(2, dtype=torch.float64, device=device)
            for i, (x, y) in enumerate(val_loader):
                if val_batches is not None and i >= val_batches:
                    break
                pred = net(x.to(device)).argmax(-1)
                counts += torch.stack([(pred == y.to(device)).sum().double(), torch.tensor(float(len(y)), device=device)])
            if strategy is not None:
                counts = strategy.reduce(counts, reduce_op="sum")
        finally:
            load_bn_state(net, saved_bn)
            for c, a in zip(list_choices(net), saved_active):
                c.active = a
            net.train(mode)
        return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")

    def random_archs(self, n: int, seed: int = 0) -> list[list[int]]:
        """``n`` uniform paths from the alive space (seeded, identical on every rank)."""
        rng = np.random.default_rng([int(seed), 7])
        return [self.sampler.random_arch(rng) for _ in range(n)]


def _all_zero(grads: list[torch.Tensor]) -> list[bool]:
    """Whether each gradient is all zeros: one fused L1 norm per device and a single host transfer."""
    if any(g.is_sparse for g in grads) or len({g.device for g in grads}) > 1:
        return [bool(torch.count_nonzero(g.coalesce().values() if g.is_sparse else g) == 0) for g in grads]
    return (torch.stack(torch._foreach_norm(grads, 1)) == 0).tolist()
