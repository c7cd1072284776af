"""The ``lnd`` command: LightningCLI with lightning_nd's models, datamodules and callbacks by short name.

Examples::

    lnd fit -c configs/quickstart.yaml
    lnd fit -c configs/reparam/repvgg_digits.yaml --trainer.max_epochs=3
    python -m lightning_nd fit --model ImageClassifier --model.model resnet18 --data DigitsDataModule
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

# Imported for their side effect: jsonargparse resolves short class names among imported subclasses.
import lightning_nd.callbacks
import lightning_nd.datamodules
import lightning_nd.modules  # noqa: F401


class LndCLI(LightningCLI):
    """LightningCLI that reports where a run's outputs went when it ends."""

    def after_fit(self) -> None:
        self._report("fit")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir).resolve()
        lines = [f"lnd {stage} finished. Outputs in {run_dir}"]
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and (cb.best_model_path or cb.last_model_path):
                lines.append(f"  checkpoint: {Path(cb.best_model_path or cb.last_model_path).resolve()}")
        if (run_dir / "config.yaml").exists():
            lines.append(f"  config:     {run_dir / 'config.yaml'}")
        lines.append(f"  logs:       {run_dir}")
        media = run_dir / "media"
        if media.is_dir():
            lines.append(f"  pictures:   {media} ({len(list(media.glob('*.png')))} PNG)")
        extra = sorted(p for p in run_dir.glob("*") if p.suffix in (".json", ".pt", ".onnx", ".ts"))
        lines += [f"  output:     {p}" for p in extra]
        rank_zero_info("\n".join(lines))


def create_cli(args: ArgsType = None, run: bool = True) -> LndCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` replaces ``sys.argv[1:]`` for calls from Python and tests."""
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
    """Entry point of ``lnd`` and ``python -m lightning_nd``."""
    create_cli(args)


if __name__ == "__main__":
    main()
