"""A resumed run appends to its ``metrics.csv`` instead of losing the rows written before the checkpoint.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it opens a log directory that is not empty, so a
run with a fixed ``version:`` (``configs/quickstart.yaml`` has ``version: search``) resumed from ``last.ckpt``
starts its metrics from scratch. :class:`KeepMetricsOnResume` reads the file before the logger opens it and, once the
checkpoint is restored (``on_train_start``), writes back the rows logged before the checkpoint's step, so the
resumed run's rows follow them. ``lnd fit --ckpt_path ...`` adds it by itself.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from typing_extensions import override

from lightning_nd.utils.files import atomic_write_text


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


RESUMED_FROM_BATCH = "resumed_from_batch"


class KeepMetricsOnResume(Callback):
    """Keep the ``metrics.csv`` rows of the run being resumed (rows with ``step`` below the restored global step).

    A run resumed from a mid-epoch checkpoint (``lnd`` saves one on SIGTERM/Ctrl-C) also logs
    ``resumed_from_batch`` (the batch the epoch resumed at) with that epoch's metrics: its epoch means cover only
    the batches from there on.

    Create it before ``trainer.fit(..., ckpt_path=...)`` starts (the logger deletes the file when fit opens it).
    Only global rank zero writes; no collectives.

    Args:
        loggers: the trainer's loggers; each ``CSVLogger`` whose ``metrics.csv`` already exists is kept.

    Example::

        trainer = Trainer(logger=CSVLogger("runs", version="search"))
        trainer.callbacks.append(KeepMetricsOnResume(trainer.loggers))
        trainer.fit(model, datamodule=dm, ckpt_path="runs/lightning_logs/search/checkpoints/last.ckpt")
    """

    def __init__(self, loggers: list[Logger]) -> None:
        self._resumed_at = 0
        self._earlier: dict[str, tuple[list[str], list[dict[str, str]]]] = {}
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                path = Path(logger.log_dir) / "metrics.csv"
                if path.is_file():
                    self._earlier[str(path)] = _read_rows(path)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resumed_at:
            pl_module.log(RESUMED_FROM_BATCH, float(self._resumed_at), on_step=False, on_epoch=True)
            self._resumed_at = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the restore (a mid-epoch restart calls no on_train_epoch_start): a checkpoint taken mid-epoch (e.g. on
        # SIGTERM) resumes at this batch, and the epoch's means cover only the batches from here on.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        self._resumed_at = done if 0 < done < trainer.num_training_batches else 0
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            path = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
            if path is None or str(path) not in self._earlier:
                continue
            header, rows = self._earlier.pop(str(path))
            kept = [row for row in rows if row.get("step") and float(row["step"]) < trainer.global_step]
            logger.save()  # anything already logged in this run goes after the kept rows
            if path.is_file():
                new_header, new_rows = _read_rows(path)
                header, kept = header + new_header, kept + new_rows
            # Lightning writes the columns sorted and appends with the writer's ``metrics_keys`` as header.
            keys = sorted(set(header))
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=keys)
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(text.getvalue(), path)
            logger.experiment.metrics_keys = keys
