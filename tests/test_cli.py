"""The `lnd` command: configs, short names, reruns, and errors raised before training."""

import os
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
# `lnd fit` of a small timm ResNet on the embedded digits
DIGITS_CLASSIFIER_ARGS = [
    "fit",
    "--model=ImageClassifier",
    "--model.model=resnet10t",
    "--model.in_chans=1",
    "--data=DigitsDataModule",
    "--data.image_size=16",
]


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
        *DIGITS_CLASSIFIER_ARGS,
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


def test_finished_command_releases_the_process_group(tmp_path):
    # Lightning's DDP strategies leave the default process group alive; left to interpreter shutdown, gloo's threads
    # sometimes abort a run that finished cleanly (exit -6, "terminate called without an active exception")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        main([*DIGITS_CLASSIFIER_ARGS, *FAST, f"--trainer.default_root_dir={tmp_path / 'run'}"])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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


# --- Errors a user can read: the last lines of `lnd`'s output name the cause (and the fix) -----------------------

RETRAIN = ["fit", "-c", "{repo}/configs/quickstart_retrain.yaml", "--trainer.fast_dev_run=1"]
DIGITS_CLASSIFIER = [*DIGITS_CLASSIFIER_ARGS, *FAST]


def _last_lines(capsys, args):
    """The lines after lnd's one-line header, which must end its output."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    (head,) = [i for i, line in enumerate(err) if line.startswith("lnd: stopped by ")]
    assert "LND_TRACEBACK=1" in err[head] and 1 <= len(err) - head - 1 <= 3
    return "\n".join(err[head + 1 :])


@pytest.fixture
def short_errors(monkeypatch):
    monkeypatch.delenv("LND_TRACEBACK", raising=False)


def _arch_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return ["--model.init_args.model.init_args.arch", str(path)]


@pytest.mark.usefixtures("short_errors")
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing arch.json", r"architecture file '.*nowhere.json' not found"),
        ("corrupt arch.json", r"corrupt.json' is not valid JSON"),
        ("arch from another space", r"does not fit the 'nb201' space"),
        ("ValueError in __init__", r"label_smoothing=1.5 must be in \[0, 1\)"),
        ("ValueError at setup", r"num_classes=5 does not match the data.*set model num_classes to 10"),
        ("mobilenet given nb201 kwargs", r"'mobilenet' takes no argument\(s\) \['C', 'N'.*; it takes \['num_classes', 'in_chans'"),
    ],
)
def test_configuration_errors_end_with_the_cause(case, expected, repo_root, tmp_path, capsys):
    retrain = [a.format(repo=repo_root) for a in RETRAIN]
    args = {
        "missing arch.json": [*retrain, "--model.init_args.model.init_args.arch", str(tmp_path / "nowhere.json")],
        "corrupt arch.json": [*retrain, *_arch_file(tmp_path, "corrupt.json", '{"best": {"arch": [1, 2')],
        "arch from another space": [
            *retrain,
            *_arch_file(tmp_path, "other.json", '{"space": "shufflenet", "ops": {"0": "shuffle3x3", "1": "xception"}}'),
        ],
        "ValueError in __init__": [*DIGITS_CLASSIFIER, "--model.label_smoothing=1.5"],
        "ValueError at setup": [*DIGITS_CLASSIFIER, "--model.num_classes=5"],
        "mobilenet given nb201 kwargs": [
            "fit",
            "-c",
            f"{repo_root}/configs/quickstart.yaml",
            "--model.init_args.supernet=mobilenet",
            *FAST,
        ],
    }[case]
    import re

    assert re.search(expected, _last_lines(capsys, args), re.S)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a GPU config on a machine without GPU")
@pytest.mark.usefixtures("short_errors")
def test_gpu_config_on_cpu_names_the_flags_that_run_it(repo_root, capsys):
    config = f"{repo_root}/configs/detection/retinanet_ifpn_coco.yaml"  # 8 GPUs, SyncBN, bf16
    last = _last_lines(capsys, ["fit", "-c", config])
    assert "accelerator='gpu' but this machine has no GPU" in last
    flags = last.splitlines()[-1].split("add: ")[1]
    assert flags == "--trainer.accelerator cpu --trainer.devices 1 --trainer.sync_batchnorm false"


def test_traceback_env_reraises_the_original_error(monkeypatch):
    monkeypatch.setenv("LND_TRACEBACK", "1")
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        main([*DIGITS_CLASSIFIER, "--model.label_smoothing=1.5"])


def test_only_configuration_and_input_errors_are_shortened():
    from lightning_nd.utils import is_user_error

    assert is_user_error(ValueError("bad value"))
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("a bug, not a configuration error") from inner
    except RuntimeError as err:
        assert not is_user_error(err)  # keeps its traceback


@pytest.mark.slow
def test_plain_ddp_on_a_supernet_names_the_strategy_to_use(repo_root, tmp_path):
    """Through the real console script: rank 0 prints the cause last, not a traceback."""
    lnd = Path(sys.executable).with_name("lnd")
    command = [str(lnd)] if lnd.exists() else [sys.executable, "-m", "lightning_nd"]
    env = {k: v for k, v in os.environ.items() if k != "LND_TRACEBACK"}
    out = subprocess.run(
        [
            *command,
            "fit",
            "-c",
            f"{repo_root}/configs/quickstart.yaml",
            "--trainer.strategy=ddp",
            "--trainer.devices=1",
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "strategy='ddp_find_unused_parameters_true'" in last and "Traceback" not in out.stderr


# --- What users expect from a training tool ----------------------------------------------------------------------


def _csv_run(tmp_path, *extra):
    return [
        *DIGITS_CLASSIFIER[:-2],
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=run",
        "--trainer.logger.version=search",
        *extra,
    ]


def test_resumed_run_appends_to_its_metrics(tmp_path):
    import csv

    main(_csv_run(tmp_path, "--trainer.max_epochs=2"))
    run = tmp_path / "run" / "search"
    first = list(csv.DictReader((run / "metrics.csv").open()))
    checkpoint = run / "checkpoints" / "last.ckpt"  # on by default
    main(_csv_run(tmp_path, "--trainer.max_epochs=3", f"--ckpt_path={checkpoint}"))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows[: len(first)] == first  # the earlier rows are kept, unchanged
    epochs = sorted({int(r["epoch"]) for r in rows if r.get("val/acc")})
    assert epochs == [0, 1, 2]  # one validation row per epoch: none lost, none repeated


def test_predict_writes_predictions_and_says_where(tmp_path, caplog):
    import csv

    main(_csv_run(tmp_path, "--trainer.max_epochs=1"))
    run = tmp_path / "run" / "search"
    checkpoint = run / "checkpoints" / "last.ckpt"  # on by default
    predict = [a for a in _csv_run(tmp_path, f"--ckpt_path={checkpoint}") if "limit_" not in a]
    with caplog.at_level("INFO"):
        main(["predict", *predict[1:], "--trainer.limit_predict_batches=2", "--data.eval_batch_size=16"])
    out = run / "predict"  # its own folder in the fit's run directory
    saved = torch.load(out / "predictions.pt")
    assert saved["predictions"].shape == (32, 10) and saved["indices"] == list(range(32))
    assert torch.allclose(saved["predictions"].sum(1), torch.ones(32))  # class probabilities
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [int(r["class"]) for r in rows] == saved["predictions"].argmax(1).tolist()
    assert f"written to {(out / 'predictions.pt').resolve()}" in caplog.text


@pytest.mark.parametrize("callbacks", [[], ["--trainer.callbacks+=lightning.pytorch.callbacks.Timer"]])
def test_progress_bar_shows_the_whole_version(tmp_path, callbacks):
    """Also when the config lists callbacks (the quickstart's showed v_num=arch: the default bar was kept), here a
    Timer, whose enum default LightningCLI could not dump into the hyperparameters before."""
    from lightning_nd.utils import VersionProgressBar

    args = [a for a in _csv_run(tmp_path, *callbacks)[1:] if "enable_progress_bar" not in a]
    cli = create_cli(args, run=False)  # the CLI replaced Lightning's default bar, which would show "v_num=arch"
    bars = [cb for cb in cli.trainer.callbacks if isinstance(cb, VersionProgressBar)]
    assert len(bars) == 1 and bars[0].get_metrics(cli.trainer, cli.model)["v_num"] == "search"


def _lnd_fit_under_ddp(cwd: Path, *args: str) -> None:
    """Run `lnd fit ARGS` as a user would, with popen DDP on 2 CPU ranks; it must exit 0 and report once (rank 0)."""
    lnd = Path(sys.executable).with_name("lnd")
    command = [str(lnd)] if lnd.exists() else [sys.executable, "-m", "lightning_nd"]
    out = subprocess.run(
        [*command, "fit", *args, "--trainer.accelerator=cpu", "--trainer.devices=2",
         "--trainer.enable_progress_bar=false"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stderr.count("lnd fit finished") + out.stdout.count("lnd fit finished") == 1


@pytest.mark.slow
@pytest.mark.ddp
def test_lnd_fit_under_real_ddp_exits_cleanly(repo_root, tmp_path):
    """`lnd fit` with popen DDP (2 CPU ranks): no collective on a subset of ranks at the end (it used to exit 1)."""
    _lnd_fit_under_ddp(
        tmp_path,
        "-c",
        f"{repo_root}/configs/quickstart.yaml",
        "--trainer.strategy=ddp_find_unused_parameters_true",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
    )
    assert (tmp_path / "runs" / "quickstart" / "search" / "arch.json").is_file()


@pytest.mark.slow
@pytest.mark.ddp
def test_lnd_fit_mdeq_under_real_ddp_exits_cleanly(repo_root, tmp_path):
    """The MDEQ config with popen DDP (2 CPU ranks) past its unrolled warm-up: solves, adjoint solves and the
    inference path (validation) run on each rank, and the run exits 0."""
    config = (Path(repo_root) / "configs" / "implicit" / "mdeq_tiny_fashion.yaml").read_text()
    assert "warmup_steps: 100" in config
    (tmp_path / "mdeq.yaml").write_text(config.replace("warmup_steps: 100", "warmup_steps: 1"))
    _lnd_fit_under_ddp(tmp_path, "-c", "mdeq.yaml", "--trainer.strategy=ddp", "--trainer.max_steps=3",
                       "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.logger=false",
                       "--trainer.enable_checkpointing=false")
