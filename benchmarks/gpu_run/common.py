"""What every part of the GPU run shares: its context (device, budget, partial reports), GPU-resident data and a
Lightning callback that fits training into the part's time budget."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_nd.datamodules.fashion_mnist import DEBIAN_DIR

FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATA_ENV = "LND_FASHION_MNIST"  # folder of the four idx files, when they are not in a default place
REPO = Path(__file__).resolve().parents[2]
DATA_DIRS = (REPO / ".device" / "fashion-mnist", Path(DEBIAN_DIR), REPO / "data" / "fashion-mnist")


def fashion_dir(explicit: str | None = None) -> tuple[Path | None, list[Path]]:
    """The first folder holding the four Fashion-MNIST idx files (``.gz`` or raw), and every folder looked in."""
    chosen = explicit or os.environ.get(DATA_ENV)
    candidates = [Path(chosen)] if chosen else list(DATA_DIRS)
    for folder in candidates:
        if all((folder / f"{stem}.gz").is_file() or (folder / stem).is_file() for stem in FASHION_FILES):
            return folder, candidates
    return None, candidates


def unpack(folder: Path, into: Path) -> Path:
    """The four idx files uncompressed in ``into`` (read once here, so that every part loads them in milliseconds)."""
    into.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_FILES:
        raw = folder / stem
        (into / stem).write_bytes(raw.read_bytes() if raw.is_file() else gzip.decompress((folder / f"{stem}.gz").read_bytes()))
    return into


def official_test(ctx: PartContext, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The official test split on the device (its first ``test_subset`` images in the smoke run)."""
    x, y = dataset_to_device(dataset, ctx.device)
    n = ctx.cfg.test_subset or len(y)
    return x[:n], y[:n]


class PartContext:
    """One part's view of the run: its settings, device, deadline, and an atomic JSON file of what it found so far.

    ``report(**values)`` merges ``values`` into the part's record and rewrites ``<path>`` atomically, so whatever a
    part reported survives when it is stopped at its cap. ``time_left()`` is the part's own (soft) budget: loops
    stop when it runs out; the runner kills the part at its hard cap a little later.
    """

    def __init__(self, name: str, cfg: Any, path: Path, deadline: float) -> None:
        self.name, self.cfg, self.path, self.deadline = name, cfg, path, deadline
        self.device = torch.device(cfg.device)
        self.record: dict[str, Any] = {}
        self._resident = 0

    def report(self, **values: Any) -> None:
        self.record.update(values)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=_jsonable))
        os.replace(tmp, self.path)
        if values and self.name in self.cfg.overrun:  # fault injection (cap test): ignore the budget from here on
            while True:
                time.sleep(0.2)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the GPU; nothing on the CPU (the smoke run checks the code paths, not the precision)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.device.type == "cuda" else "32-true"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory(self) -> float | None:
        """Peak GPU memory (MiB) since the last ``reset_peak_memory``, above what was allocated then (the data, say);
        ``None`` on the CPU."""
        if self.device.type != "cuda":
            return None
        return (torch.cuda.max_memory_allocated(self.device) - self._resident) / 2**20

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._resident = torch.cuda.memory_allocated(self.device)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def dataset_to_device(dataset: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a (possibly relabelled) ``ImageTensorDataset`` as one normalised ``(N, 1, S, S)`` tensor and its labels.

    The same arithmetic as ``ImageTensorDataset.transform`` (scale, normalise, pad with the background), done once
    for the whole split on ``device`` instead of per item: the GPU then never waits for a loader.
    """
    labels = dataset.labels
    inner = getattr(dataset, "dataset", dataset)  # RandomLabels wraps the split and replaces the labels
    if inner.resize != "pad" or inner.augment:
        raise ValueError("dataset_to_device handles padded, unaugmented splits only")
    x = (inner.images.to(device).float() / inner.scale - inner.mean) / inner.std
    x = x[:, None]
    size = inner.image_size or x.shape[-1]
    total = size - x.shape[-1]
    before = total // 2
    x = torch.nn.functional.pad(x, (before, total - before, before, total - before), value=-inner.mean / inner.std)
    return x.contiguous(), labels.to(device)


@dataclass
class DeviceBatches:
    """Shuffled (or ordered) minibatches of device-resident tensors: an iterable Lightning trains on directly."""

    x: torch.Tensor  # (N, 1, S, S) images
    y: torch.Tensor  # (N,) labels
    batch_size: int  # images per batch
    shuffle: bool = True  # reshuffle every pass (seeded by `seed` and the pass number)
    channels: int = 1  # replicate the gray channel to this many
    seed: int = 0  # shuffling seed
    drop_last: bool = True  # drop the incomplete last batch
    passes: int = field(default=0, init=False)  # passes started so far

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.passes)).to(self.y.device)
        else:
            order = torch.arange(n, device=self.y.device)
        self.passes += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx].expand(-1, self.channels, -1, -1), self.y[idx]


class BudgetSchedule(Callback):
    """Fit a training run into a time budget: warm-up, then a cosine learning rate over the steps that fit.

    The first ``calib_steps`` optimizer steps run with a linear warm-up, those from ``calib_from`` on are timed (the
    steps before may differ, e.g. a DEQ's unrolled warm-up, and on a GPU the first steps also load kernels and
    create library handles, which would inflate a short calibration several times); then the run plans its total
    number of steps (``max_steps`` at most; whole epochs when at least one fits) so that training ends before
    ``deadline`` and decays the learning rate to zero by a cosine over the remaining steps. The plan is redone at
    the end of every epoch from the mean step time since ``calib_from`` (the load on a shared GPU changes as the
    other parts start and finish; a late plan that is too optimistic would end training by the deadline with the
    learning rate still high). Training stops at the planned step, or earlier if the deadline passes anyway.
    ``epoch_times`` holds the wall seconds of every complete epoch, ``plans`` every planned total. The base learning
    rate is read from each parameter group's ``initial_lr`` (set here at train start).
    """

    def __init__(self, deadline: float, steps_per_epoch: int, calib_steps: int = 30, max_steps: int | None = None,
                 sync: Callable[[], None] | None = None, calib_from: int = 0) -> None:
        if not 0 <= calib_from < calib_steps:
            raise ValueError(f"need 0 <= calib_from < calib_steps, got {calib_from} and {calib_steps}")
        self.deadline, self.steps_per_epoch, self.calib_steps = deadline, steps_per_epoch, calib_steps
        self.calib_from = calib_from
        self.max_steps, self.sync = max_steps, sync or (lambda: None)
        self.total_steps: int | None = None
        self.plans: list[int] = []
        self.epoch_times: list[float] = []
        self.stopped_by_deadline = False

    def factor(self, step: int) -> float:
        return lr_factor(step, self.calib_steps, self.total_steps)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sync()
        self._t_epoch = time.monotonic()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sync()
        step = trainer.global_step
        if step % self.steps_per_epoch == 0:
            self.epoch_times.append(time.monotonic() - self._t_epoch)
        if self.total_steps is not None and step < self.total_steps:
            self._plan(step)
            if step >= self.total_steps:
                trainer.should_stop = True

    def _plan(self, step: int) -> None:
        """Plan the total steps from the mean time per step since ``calib_from`` (call after a sync)."""
        now = time.monotonic()
        per_step = (now - self._t_calib) / (step - self.calib_from)
        self.total_steps = plan_steps(step, per_step, self.deadline - now, self.steps_per_epoch, self.max_steps)
        self.plans.append(self.total_steps)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.calib_from:
            self.sync()
            self._t_calib = time.monotonic()
        factor = self.factor(trainer.global_step)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.calib_steps and self.total_steps is None:
            self.sync()
            self._plan(step)
        limit = self.total_steps if self.total_steps is not None else self.max_steps
        if limit is not None and step >= limit:
            trainer.should_stop = True
        elif time.monotonic() > self.deadline:
            trainer.should_stop, self.stopped_by_deadline = True, True


def lr_factor(step: int, calib_steps: int, total_steps: int | None) -> float:
    """Learning-rate multiplier: linear warm-up over the calibration steps, then a cosine to 0 at ``total_steps``."""
    if step < calib_steps or total_steps is None:
        return (step + 1) / (calib_steps + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - calib_steps) / max(1, total_steps - calib_steps))))


def plan_steps(done: int, per_step: float, seconds_left: float, steps_per_epoch: int, max_steps: int | None) -> int:
    """Total steps: ``max_steps`` if they fit, else what ``seconds_left`` allows after ``done``, rounded down to whole
    epochs when at least one fits."""
    total = done + max(0, int(0.95 * seconds_left / max(per_step, 1e-9)))
    if max_steps is not None and total >= max_steps:
        return max(max_steps, done)
    if total >= steps_per_epoch:
        total -= total % steps_per_epoch
    return max(total, done)


def trainer(ctx: PartContext, callbacks: list, **kwargs: Any) -> pl.Trainer:
    """A quiet single-device Trainer in the part's precision; stops come from the callbacks (``BudgetSchedule``)."""
    return pl.Trainer(accelerator=ctx.device.type, devices=1, precision=ctx.precision, max_epochs=-1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, **kwargs)


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start
