"""The ``lnd`` command: LightningCLI with lightning_nd's models, datamodules and callbacks by short name.

On top of LightningCLI it: ends a configuration or input error with the cause and the fix as the last lines
(``LND_TRACEBACK=1`` for the full traceback), says which flags run a GPU config on a CPU-only machine, writes
``lnd predict``'s predictions into the run directory, keeps the earlier ``metrics.csv`` rows of a resumed run,
shows the logger's whole version in the progress bar, and reports where a run's outputs went.

Examples::

    lnd fit -c configs/quickstart.yaml
    lnd fit -c configs/reparam/repvgg_digits.yaml --trainer.max_epochs=3
    python -m lightning_nd fit --model ImageClassifier --model.model resnet18 --data DigitsDataModule
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.enums import StrEnum

# Imported for their side effect: jsonargparse resolves short class names among imported subclasses.
import lightning_nd.callbacks
import lightning_nd.datamodules
import lightning_nd.modules  # noqa: F401
from lightning_nd.callbacks import PredictionWriter
from lightning_nd.utils import (
    KeepMetricsOnResume,
    VersionProgressBar,
    explain_parser_error,
    format_user_error,
    is_user_error,
    run_dir,
    traceback_wanted,
)
from lightning_nd.utils.interrupt import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    CheckpointMatch,
    SaveOnInterrupt,
    check_checkpoint_file,
    check_checkpoint_model,
)
from lightning_nd.utils.rundir import RunDirClaim, claim_run_dir, is_resume, plan_run_dir

# LightningCLI dumps the whole config with yaml.safe_dump to keep the model's hyperparameters; Lightning's string enums
# (Timer's default interval=Interval.step) are not representable there, so any config listing a Timer crashed.
yaml.SafeDumper.add_multi_representer(StrEnum, lambda dumper, value: dumper.represent_str(str(value.value)))


class _NoTips(logging.Filter):
    """Drop Lightning's advertising lines ("💡 Tip: ... try installing litlogger/litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith("💡 Tip")


TRACEBACK_HINT = "LND_TRACEBACK=1 prints the traceback"

# lnd gives every new run an empty directory (an earlier run is moved aside) and a resumed run keeps its rows
# (KeepMetricsOnResume), so CSVLogger's "Previous log files ... will be deleted" never applies; its lock file
# alone would trigger it.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")

for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoTips())


def check_accelerator(trainer_config: dict) -> None:
    """Stop a GPU config on a machine without a GPU before anything is built, naming the flags that run it on CPU.

    Raises:
        MisconfigurationException: when ``accelerator`` is ``gpu``/``cuda`` and no CUDA (or MPS for ``gpu``)
            device is available.
    """
    accelerator = trainer_config.get("accelerator")
    if not isinstance(accelerator, str) or accelerator.lower() not in ("gpu", "cuda"):
        return
    mps = accelerator.lower() == "gpu" and torch.backends.mps.is_available()
    if torch.cuda.is_available() or mps:
        return
    flags = ["--trainer.accelerator cpu"]
    if str(trainer_config.get("devices", "auto")) not in ("1", "auto"):
        flags.append("--trainer.devices 1")
    precision = str(trainer_config.get("precision") or "")
    if precision.startswith("16") or precision == "fp16":
        flags.append("--trainer.precision bf16-mixed")  # fp16 autocast is GPU-only
    if trainer_config.get("sync_batchnorm"):
        flags.append("--trainer.sync_batchnorm false")
    raise MisconfigurationException(
        f"this config asks for accelerator={accelerator!r} but this machine has no GPU.\n"
        f"To run it on the CPU (slowly), add: {' '.join(flags)}"
    )


class LndCLI(LightningCLI):
    """LightningCLI with readable configuration errors, one run directory per command (locked, earlier runs kept),
    resumable interruption, prediction files, resumable metrics and a run report.

    Every command gets a run directory of its own (:func:`~lightning_nd.utils.rundir.plan_run_dir`): ``predict``,
    ``validate`` and ``test`` of a run write into ``<run dir>/<command>``; a directory held by another live process
    is refused; a new run into a used directory first moves the earlier run aside (``<dir>.1``); SIGTERM or Ctrl-C
    during ``fit`` saves ``last.ckpt``, prints the command that resumes the run and exits 143 or 130.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        self.command_line: list[str] | None = (
            [str(a) for a in given] if isinstance(given, (list, tuple)) else None if given is not None else sys.argv[1:]
        )
        self.started = time.time()
        self.claim: RunDirClaim | None = None
        self.interrupt = SaveOnInterrupt()
        self.checkpoint_match: CheckpointMatch | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException as err:
            self.release()
            self._raise_interrupted(err)
            if self.checkpoint_match is not None and self.checkpoint_match.diagnosis is not None:
                raise MisconfigurationException(self.checkpoint_match.diagnosis) from err
            raise

    def release(self) -> None:
        """Give the run directory back (its lock file goes)."""
        if self.claim is not None:
            self.claim.release()

    def _raise_interrupted(self, err: BaseException) -> None:
        """Exit 143/130 with the resume command after an interruption (Lightning exits 0 or 1 itself)."""
        signal_name = self.interrupt.signal or ("SIGTERM" if isinstance(err, SIGTERMException) else None)
        if signal_name is None:
            return
        code = EXIT_SIGTERM if signal_name == "SIGTERM" else EXIT_SIGINT
        lines = [f"lnd {self.subcommand} stopped by {signal_name} at {self.interrupt.where or 'start-up'}."]
        if self.interrupt.saved is not None:
            lines.append(f"A resumable checkpoint is saved: {self.interrupt.saved}")
            lines.append(f"Resume with: {self.resume_command(self.interrupt.saved)}")
        else:
            lines.append("Nothing was saved (not fitting, or Ctrl-C under DDP); rerun the command to start again.")
        sys.stdout.flush()
        print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(code) from err

    def resume_command(self, checkpoint: Path) -> str:
        """This command line with ``--ckpt_path`` set to ``checkpoint``."""
        args, skip = [], False
        for arg in self.command_line or [self.subcommand or "fit"]:
            if skip:
                skip = False
                continue
            if arg == "--ckpt_path":
                skip = True
                continue
            if not arg.startswith("--ckpt_path="):
                args.append(arg)
        return shlex.join(["lnd", *args, "--ckpt_path", str(checkpoint)])

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Raise instead of printing 60 lines of usage: main() prints the cause and the fix.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI reads the checkpoint's hyperparameters into the config (and swaps in its model class)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None:
            check_checkpoint_file(ckpt_path)
            model = self.config[subcommand].get("model")
            check_checkpoint_model(ckpt_path, model.get("class_path") if hasattr(model, "get") else None)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_threads", type=Optional[int], default=None,
            help="torch intra-op threads for this run (torch.set_num_threads). Float reductions depend on the thread "
                 "count, so a run whose result must not depend on the machine's cores (the quickstart's pick) sets it.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        check_accelerator(trainer.as_dict() if hasattr(trainer, "as_dict") else dict(trainer or {}))
        threads = config.get("torch_threads")
        if threads is not None:
            if threads < 1:
                raise MisconfigurationException(f"torch_threads={threads} must be >= 1 (or null: torch's default)")
            torch.set_num_threads(threads)
            # Lightning's DDP launchers set torch's threads to cores / processes unless OMP_NUM_THREADS is set, which
            # would override this under `--trainer.devices N` but not under torchrun; child processes inherit it too
            os.environ["OMP_NUM_THREADS"] = str(threads)
        if self.subcommand:
            plan_run_dir(config, self.subcommand)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # Asked before the trainer exists: LightningCLI hands the config's callback list itself to the Trainer, which
        # then appends its default bar to it.
        bar_configured = self._configured(TQDMProgressBar)
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning's default bar shows only the last 4 characters of a string version ("v_num=arch" for "search").
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) is TQDMProgressBar and not bar_configured:
                trainer.callbacks[i] = VersionProgressBar()
        if not self.subcommand:
            return trainer
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        if checkpoints and not any(cb.save_last for cb in checkpoints) and checkpoints[0].save_last is None:
            checkpoints[0].save_last = True  # README: resume from last.ckpt
        if trainer.loggers and not isinstance(trainer.loggers[0], (CSVLogger, TensorBoardLogger)):
            # wandb & co.: Lightning would put checkpoints in <save_dir>/<name>/<version>, not in the run directory
            for cb in checkpoints:
                if cb.dirpath is None:
                    cb.dirpath = str(folder / "checkpoints")
        trainer.callbacks.append(self.interrupt)
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is not None:
            self.checkpoint_match = CheckpointMatch(ckpt_path)
            trainer.callbacks.append(self.checkpoint_match)
        if rank_zero_only.rank == 0:
            # fit into its own directory: a resumed run continues it; without a logger the folder is shared
            resume = self.subcommand == "fit" and (trainer.logger is None or is_resume(ckpt_path, folder))
            command = shlex.join(["lnd", *(self.command_line or [])])
            self.claim = claim_run_dir(folder, resume=resume, command=command)
            atexit.register(self.claim.release)
            if self.claim.archived is not None:
                rank_zero_info(f"{folder} held an earlier run: moved to {self.claim.archived} (nothing deleted)")
        return trainer

    def _configured(self, cls: type) -> bool:
        callbacks = self.config_init[self.subcommand]["trainer"].get("callbacks") if self.subcommand else None
        return any(isinstance(cb, cls) for cb in callbacks or [])

    def before_fit(self) -> None:
        if self.config_init[self.subcommand].get("ckpt_path") is not None:
            self.trainer.callbacks.append(KeepMetricsOnResume(self.trainer.loggers))

    def before_predict(self) -> None:
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_fit(self) -> None:
        self._report("fit")

    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def after_predict(self) -> None:
        self._report("predict")

    def _report(self, stage: str) -> None:
        """Say where this command's outputs went: only files it wrote (a predict lists no fit checkpoint)."""
        trainer = self.trainer
        folder = run_dir(trainer).resolve()  # a collective: every rank, before rank 0 alone goes on
        self.release()
        if not trainer.is_global_zero:
            return
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()  # this command's run is complete (a next command in-process gets its own)

        def ours(path: Path) -> bool:
            return path.is_file() and path.stat().st_mtime >= self.started - 1.0

        lines = [f"lnd {stage} finished. Outputs in {folder}"]
        # only a fit writes checkpoints; a predict right after its fit would see the fit's as fresh files
        for cb in trainer.checkpoint_callbacks if stage == "fit" else ():
            if isinstance(cb, ModelCheckpoint) and (cb.best_model_path or cb.last_model_path):
                path = Path(cb.best_model_path or cb.last_model_path).resolve()
                if ours(path):
                    lines.append(f"  checkpoint: {path}")
        if ours(folder / "config.yaml"):
            lines.append(f"  config:     {folder / 'config.yaml'}")
        lines.append(f"  logs:       {folder}")
        media = folder / "media"
        pictures = [p for p in media.glob("*.png") if ours(p)] if media.is_dir() else []
        if pictures:
            lines.append(f"  pictures:   {media} ({len(pictures)} PNG)")
        suffixes = (".json", ".pt", ".pt2", ".csv", ".onnx", ".ts")
        extra = sorted(p for p in folder.glob("*") if p.suffix in suffixes and ours(p) and p.name != "metrics.csv")
        lines += [f"  output:     {p}" for p in extra]
        rank_zero_info("\n".join(lines))


def create_cli(args: ArgsType = None, run: bool = True) -> LndCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` replaces ``sys.argv[1:]`` for calls from Python and tests.

    Errors propagate as raised; :func:`main` turns configuration errors into a short message.
    """
    return LndCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def release_process_group() -> None:
    """Destroy the default process group a finished run leaves behind (Lightning's DDP strategies keep it).

    Without this, gloo's worker threads can still be alive while the interpreter shuts down, and a DDP run that
    finished cleanly sometimes ends with ``terminate called without an active exception`` and exit code -6 (SIGABRT;
    pytorch/pytorch#190489). Called only after a successful command: after an error other ranks may still be inside a
    collective, and the torchtitan launcher avoids the same cleanup there for that reason.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(args: ArgsType = None) -> None:
    """Entry point of ``lnd`` and ``python -m lightning_nd``.

    A configuration or input error (raised while building the config's classes, or a ``ValueError``,
    ``MisconfigurationException`` or ``FileNotFoundError`` from a run) ends the command with exit code 2 and two
    lines on stderr: where it was raised, then its message (cause and fix). ``LND_TRACEBACK=1`` re-raises instead.

    Raises:
        SystemExit: with code 2 for a configuration or input error (the error is its ``__cause__``).
    """
    try:
        create_cli(args)
    except KeyboardInterrupt as err:  # Ctrl-C outside the trainer (while parsing or building the config)
        raise SystemExit(EXIT_SIGINT) from err
    except Exception as err:
        if traceback_wanted() or not is_user_error(err):
            raise
        sys.stdout.flush()
        if isinstance(err, ArgumentError):
            given = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else []
            subcommand = next((a for a in given if a in ("fit", "validate", "test", "predict")), None)
            message = explain_parser_error(str(err), [str(a) for a in given], subcommand)
            print(f"lnd: stopped by a configuration error ({TRACEBACK_HINT})\n{message}", file=sys.stderr, flush=True)
        else:
            print(format_user_error(err), file=sys.stderr, flush=True)
        raise SystemExit(2) from err
    release_process_group()


if __name__ == "__main__":
    main()
