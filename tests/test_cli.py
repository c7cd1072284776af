"""The `lnd` command: configs, short names, reruns, and errors raised before training."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_nd.cli import create_cli, main
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import ImageClassifier

FAST = ["--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false"]


def test_quickstart_config_fast_dev_run(repo_root):
    main(["fit", "-c", str(Path(repo_root) / "configs" / "quickstart.yaml"), *FAST])


def test_short_names_and_optimizer_callable():
    cli = create_cli(
        [
            "fit",
            "--model=ImageClassifier",
            "--model.model=resnet10t",
            "--model.in_chans=1",
            "--model.optimizer=torch.optim.AdamW",
            "--model.optimizer.lr=0.003",
            "--data=DigitsDataModule",
            "--data.image_size=16",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.model, ImageClassifier) and isinstance(cli.datamodule, DigitsDataModule)
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 0.003
    assert cli.trainer.global_step == 2


def test_config_saved_to_run_dir_on_rerun(tmp_path, capsys):
    args = [
        "fit",
        "--model=ImageClassifier",
        "--model.model=resnet10t",
        "--model.in_chans=1",
        "--data=DigitsDataModule",
        "--data.image_size=16",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'run'}",
        "--trainer.logger.version=fixed",
    ]
    main(args)
    main(args)  # same log dir: must not fail on the existing config.yaml
    assert (tmp_path / "run" / "lightning_logs" / "fixed" / "config.yaml").is_file()


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "lightning_nd", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="unknown model name 'resnet_does_not_exist'"):
        ImageClassifier("resnet_does_not_exist")


def _fit(model, datamodule):
    import lightning.pytorch as pl

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=datamodule)
    return trainer


def test_class_count_mismatch_fails_before_training():
    model = ImageClassifier("resnet10t", num_classes=5, in_chans=1)
    with pytest.raises(ValueError, match="num_classes=5 does not match the data.*10 classes"):
        _fit(model, DigitsDataModule(image_size=16))
    assert model.trainer.global_step == 0


class FixedInputNet(nn.Module):
    """A network that only accepts 1x32x32 inputs (its classifier has a fixed size)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(self.conv(x), 2).flatten(1))


def test_image_too_small_fails_before_training():
    with pytest.raises(ValueError, match=r"input of shape \(1, 8, 8\) from DigitsDataModule does not fit the network"):
        _fit(ImageClassifier(FixedInputNet()), DigitsDataModule())
    _fit(ImageClassifier(FixedInputNet()), DigitsDataModule(image_size=32))
