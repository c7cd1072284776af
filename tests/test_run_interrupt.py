"""Issue 26: an interrupted `lnd fit` saves last.ckpt, prints the command that resumes it and exits 143 (SIGTERM)
or 130 (Ctrl-C); the resumed run ends where the uninterrupted run ends. Errors end with their cause and fix."""

import csv
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nd.cli import main
from tests.test_cli import _last_lines
from tests.test_run_dirs import REPO, digits_run, lnd_command, lnd_env


class SignalAt(Callback):
    """Send ``signal`` to this process once ``global_step`` reaches ``step`` (mid-epoch)."""

    def __init__(self, step: int = 3, signal: str = "SIGTERM") -> None:
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class Pause(Callback):
    """Wait at the first training batch until ``<folder>/go`` exists (after creating ``<folder>/paused``)."""

    def __init__(self, folder: str = ".") -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "paused").touch()
            deadline = time.time() + 300
            while not (self.folder / "go").exists() and time.time() < deadline:
                time.sleep(0.2)


def five_steps(save_dir, *extra, version="fit"):
    return digits_run(save_dir, "--seed_everything=0", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=0", *extra,
                      version=version)


def weights(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_last_ckpt_and_the_resume_equals_the_uninterrupted_run(tmp_path):
    killed = subprocess.run(
        [*lnd_command(), *five_steps(tmp_path, "--trainer.callbacks+=tests.test_run_interrupt.SignalAt",
                                     "--trainer.callbacks.step=3")],
        cwd=tmp_path, env=lnd_env(), capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == 143, killed.stderr[-3000:]
    last = tmp_path / "run" / "fit" / "checkpoints" / "last.ckpt"
    saved, resume = killed.stderr.strip().splitlines()[-2:]
    assert str(last) in saved and resume.startswith("Resume with: lnd fit ") and resume.endswith(f"--ckpt_path {last}")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3 and checkpoint["epoch"] == 0  # mid-epoch (5 batches per epoch)

    main(shlex.split(resume.removeprefix("Resume with: lnd ")))  # the printed command, as printed
    main(five_steps(tmp_path, version="whole"))  # the same run, not interrupted
    resumed, whole = weights(last), weights(tmp_path / "run" / "whole" / "checkpoints" / "last.ckpt")
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # same data order, same steps: bit-equal
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5
    rows = list(csv.DictReader((tmp_path / "run" / "fit" / "metrics.csv").open()))
    assert [float(r["resumed_from_batch"]) for r in rows if r.get("resumed_from_batch")] == [3.0]  # flagged


def test_ctrl_c_saves_last_ckpt_and_exits_130(tmp_path, capsys):
    # Ctrl-C in a terminal reaches Python's KeyboardInterrupt handler; a harness that starts pytest as a background
    # job of a non-interactive shell (`cmd &`) hands it SIGINT ignored, which would make the signal a no-op here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(five_steps(tmp_path, "--trainer.callbacks+=tests.test_run_interrupt.SignalAt",
                            "--trainer.callbacks.step=2", "--trainer.callbacks.signal=SIGINT"))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert exit_info.value.code == 130
    last = tmp_path / "run" / "fit" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"--ckpt_path {last}")


# --- errors end with their cause and fix ------------------------------------------------------------------------


@pytest.fixture
def short_errors(monkeypatch):
    monkeypatch.delenv("LND_TRACEBACK", raising=False)


@pytest.mark.usefixtures("short_errors")
def test_nested_typo_names_the_key_the_allowed_ones_and_the_closest(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  callbacks:\n    - class_path: lightning_nd.callbacks.AngleTracker\n"
                    "      init_args: {every_n_epoch: 1}\n")
    cause, fix = _last_lines(capsys, ["fit", "-c", str(REPO / "configs/quickstart.yaml"), "-c", str(typo)]).splitlines()
    assert "AngleTracker has no argument 'every_n_epoch'" in cause and "trainer.callbacks" in cause
    assert fix.startswith("did you mean 'every_n_epochs'?") and "preset" in fix


@pytest.mark.usefixtures("short_errors")
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: 1\n   logger: [\n")
    cause, fix = _last_lines(capsys, ["fit", "-c", str(bad)]).splitlines()
    assert f"{bad}: YAML syntax error at line 3" in cause and f"{bad}:3" in fix


@pytest.mark.usefixtures("short_errors")
def test_truncated_and_foreign_checkpoints_say_so(tmp_path, capsys):
    main(digits_run(tmp_path))
    ckpt = tmp_path / "run" / "fit" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    cause, fix = _last_lines(capsys, digits_run(tmp_path, f"--ckpt_path={truncated}", version="b")).splitlines()
    assert f"checkpoint {truncated} is truncated or corrupt" in cause and fix.startswith("Pass another checkpoint")

    quickstart = ["fit", "-c", str(REPO / "configs/quickstart.yaml"), "--trainer.fast_dev_run=1",
                  "--trainer.enable_progress_bar=false", f"--ckpt_path={ckpt}"]
    cause, fix = _last_lines(capsys, quickstart).splitlines()
    assert f"checkpoint {ckpt} is from another model" in cause
    assert "lightning_nd.modules.ImageClassifier" in cause and "SupernetModule" in cause
    assert "config.yaml" in fix
