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

import sys
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

# Imported for their side effect: jsonargparse resolves short class names among imported subclasses.
import lightning_nd.callbacks
import lightning_nd.datamodules
import lightning_nd.modules  # noqa: F401
from lightning_nd.callbacks import PredictionWriter
from lightning_nd.utils import (
    KeepMetricsOnResume,
    VersionProgressBar,
    format_user_error,
    is_user_error,
    run_dir,
    traceback_wanted,
)


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
    """LightningCLI with readable configuration errors, prediction files, resumable metrics and a run report."""

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

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning's default bar shows only the last 4 characters of a string version ("v_num=arch" for "search").
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) is TQDMProgressBar and not self._configured(TQDMProgressBar):
                trainer.callbacks[i] = VersionProgressBar()
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

    def after_test(self) -> None:
        self._report("test")

    def after_predict(self) -> None:
        self._report("predict")

    def _report(self, stage: str) -> None:
        trainer = self.trainer
        folder = run_dir(trainer).resolve()  # a collective: every rank, before rank 0 alone goes on
        if not trainer.is_global_zero:
            return
        lines = [f"lnd {stage} finished. Outputs in {folder}"]
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and (cb.best_model_path or cb.last_model_path):
                lines.append(f"  checkpoint: {Path(cb.best_model_path or cb.last_model_path).resolve()}")
        if (folder / "config.yaml").exists():
            lines.append(f"  config:     {folder / 'config.yaml'}")
        lines.append(f"  logs:       {folder}")
        media = folder / "media"
        if media.is_dir():
            lines.append(f"  pictures:   {media} ({len(list(media.glob('*.png')))} PNG)")
        extra = sorted(p for p in folder.glob("*") if p.suffix in (".json", ".pt", ".pt2", ".csv", ".onnx", ".ts"))
        lines += [f"  output:     {p}" for p in extra if p.name != "metrics.csv"]
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
    except Exception as err:
        if traceback_wanted() or not is_user_error(err):
            raise
        sys.stdout.flush()
        print(format_user_error(err), file=sys.stderr, flush=True)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
