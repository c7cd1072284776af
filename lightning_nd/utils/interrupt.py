"""An interrupted run is not a finished one: save where it stopped, say how to resume, exit non-zero.

Lightning turns SIGTERM into ``SIGTERMException`` (a ``SystemExit`` with code 0) and Ctrl-C into ``sys.exit(1)``
without a checkpoint of the interrupted state. :class:`SaveOnInterrupt` saves ``last.ckpt`` (the training state at
the interrupted batch, which the datamodules resume exactly) when a fit is interrupted; ``lnd`` then prints the
command that resumes it and exits 143 (SIGTERM) or 130 (SIGINT), the shell conventions for a signalled job.
Checkpoints are also checked before a run uses them: :func:`check_checkpoint_file` (truncated or corrupt files)
and :class:`CheckpointMatch` (a checkpoint of another model, diagnosed when loading it fails).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def interrupt_signal(exception: BaseException) -> str | None:
    """``"SIGTERM"`` / ``"SIGINT"`` for the exceptions Lightning raises on those signals, else None."""
    if isinstance(exception, SIGTERMException):
        return "SIGTERM"
    if isinstance(exception, KeyboardInterrupt):
        return "SIGINT"
    return None


class SaveOnInterrupt(Callback):
    """Save a resumable ``last.ckpt`` when a fit is stopped by SIGTERM or Ctrl-C (``lnd`` adds it).

    The checkpoint goes to the first ``ModelCheckpoint``'s folder, else ``<log dir>/checkpoints``. Under DDP a
    SIGTERM reaches every rank (Lightning broadcasts it) and all of them save together; a Ctrl-C reaches one rank
    only, so nothing is saved there (saving is a collective) and the message says so.

    Attributes:
        signal: ``"SIGTERM"`` or ``"SIGINT"`` once interrupted, else None.
        saved: the checkpoint written, or None.

    Example::

        interrupt = SaveOnInterrupt()
        trainer = Trainer(callbacks=[interrupt])
        trainer.fit(model, datamodule=dm)   # kill -TERM <pid> -> interrupt.saved == <run>/checkpoints/last.ckpt
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self.saved: Path | None = None
        self.where = ""

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.signal = interrupt_signal(exception)
        if self.signal is None:
            return
        self.where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        if trainer.state.fn != TrainerFn.FITTING or (self.signal == "SIGINT" and trainer.world_size > 1):
            return
        checkpoint = trainer.checkpoint_callback
        folder = getattr(checkpoint, "dirpath", None)
        if folder is None:
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = os.path.join(folder, "last.ckpt")
        if isinstance(checkpoint, ModelCheckpoint):
            # spelled as ModelCheckpoint spells it and recorded in the checkpoint: the resumed run's ModelCheckpoint
            # then overwrites this last.ckpt (instead of writing last-v1.ckpt beside a file it does not know)
            path = checkpoint.format_checkpoint_name({}, checkpoint.CHECKPOINT_NAME_LAST)
            checkpoint.last_model_path = path
        trainer.save_checkpoint(path)
        self.saved = Path(path)


def check_checkpoint_file(path: str | Path) -> None:
    """Fail early, with cause and fix, for a checkpoint that is missing, truncated or corrupt.

    Torch checkpoints are zip archives: a truncated file has no central directory and a corrupt one fails a member's
    CRC, both found without unpickling anything.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        MisconfigurationException: for a truncated or corrupt checkpoint.
    """
    path = Path(path)
    if "://" in str(path):
        return  # remote checkpoints are Lightning's business
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found.\nPass the path of an existing .ckpt file (a run's checkpoints/ folder)"
        )
    if not zipfile.is_zipfile(path):
        with path.open("rb") as file:
            head = file.read(4)
        if head[:1] == b"\x80" and path.stat().st_size > 1024:
            return  # torch's legacy (pre-1.6) pickle format: only a full load can check it
        raise MisconfigurationException(
            f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes, not a complete torch archive; "
            "was its copy or its save interrupted?).\n"
            "Pass another checkpoint (e.g. the run's last.ckpt or an epoch=*.ckpt), or copy this one again"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is None:
            # the archive's records can look whole on a cut file (its own end records match inside tensor data):
            # torch reads the index and the pickle (tensors stay memory-mapped, unread)
            torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return
        reason = f"its part {bad!r} fails its checksum"
    except (zipfile.BadZipFile, RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) and "Unsupported operand" not in text and "truncated" not in text:
            return  # weights_only refused a global: not damage; Lightning's own load decides
        if isinstance(err, RuntimeError) and not any(k in text for k in ("zip", "PytorchStreamReader", "archive")):
            return
        reason = text.splitlines()[0][:160]
    raise MisconfigurationException(
        f"checkpoint {path} is truncated or corrupt ({reason}).\n"
        "Pass another checkpoint (e.g. the run's last.ckpt or an epoch=*.ckpt), or copy this one again"
    )


def _load_class(class_path: str) -> Any:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def check_checkpoint_model(path: str | Path, model_class_path: str | None) -> None:
    """Stop, with cause and fix, when the checkpoint was saved by another LightningModule class than the config's.

    LightningCLI would otherwise swap the config's model for the checkpoint's class (it merges the checkpoint's
    hyperparameters into the config) and the run fails later, somewhere unrelated (a callback that needs a
    supernet, missing weights).

    Raises:
        MisconfigurationException: when the classes differ.
    """
    if not model_class_path or "://" in str(path):
        return
    try:
        hparams = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("hyper_parameters") or {}
    except pickle.UnpicklingError:
        return  # objects weights_only refuses: Lightning's own load reports it
    saved = hparams.get("_class_path")
    if saved and _load_class(saved) is not _load_class(model_class_path):
        raise MisconfigurationException(
            f"checkpoint {path} is from another model: it was saved by {saved}, and this config builds "
            f"{model_class_path}.\n"
            "Pass a checkpoint of this config's runs, or the config it was trained with (its run directory holds "
            "that config.yaml)"
        )


def _model_of(checkpoint: dict[str, Any]) -> str:
    hparams = checkpoint.get("hyper_parameters") or {}
    return str(hparams.get("_class_path") or "an unrecorded model class")


class CheckpointMatch(Callback):
    """When a run with ``ckpt_path`` fails, say so if the checkpoint was saved by another model (``lnd`` adds it).

    A checkpoint of another model fails in whatever first touches the model (a callback's setup, the weight
    load); the error is then about that place, not the cause. After a failure this compares the checkpoint's model
    class and weight names with the running model and, if they differ, replaces the message (``lnd`` prints
    :attr:`diagnosis` as the error's cause and fix; the original error stays chained).

    Args:
        ckpt_path: the checkpoint the run loads.
    """

    def __init__(self, ckpt_path: str | Path) -> None:
        self.ckpt_path = Path(ckpt_path)
        self.diagnosis: str | None = None

    def _differs(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> str | None:
        hparams = checkpoint.get("hyper_parameters") or {}
        ours = dict(getattr(pl_module, "hparams", {}) or {})
        theirs_class, our_class = hparams.get("_class_path"), ours.get("_class_path")
        if theirs_class and our_class and theirs_class != our_class:
            return f"it was saved by {theirs_class}, and this run builds {our_class}"
        saved, current = set(checkpoint.get("state_dict") or {}), set(pl_module.state_dict())
        if saved and current and len(saved & current) < 0.5 * len(saved):
            example = sorted(saved - current)[:2]
            return (f"only {len(saved & current)} of its {len(saved)} weight names exist in this run's model "
                    f"(e.g. {', '.join(example)})")
        return None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if interrupt_signal(exception) is not None or not self.ckpt_path.is_file():
            return
        try:
            checkpoint = torch.load(self.ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # an unreadable file is reported by check_checkpoint_file instead
            return
        difference = self._differs(pl_module, checkpoint)
        if difference is not None:
            self.diagnosis = (
                f"checkpoint {self.ckpt_path} is from another model: {difference}.\n"
                f"Pass a checkpoint of this config's runs, or the config it was trained with "
                f"({_model_of(checkpoint)}; its run directory holds that config.yaml)"
            )
