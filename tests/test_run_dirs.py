"""Issue 26: never lose a run. Every `lnd` command writes into its own run directory, a rerun keeps the earlier
run, a directory held by a live run is refused, and every logger keeps a run's outputs in that run's directory."""

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_nd.cli import main
from lightning_nd.utils.rundir import LOCK_NAME, claim_run_dir
from tests.test_cli import DIGITS_CLASSIFIER_ARGS, _last_lines

REPO = Path(__file__).resolve().parents[1]


def digits_run(save_dir, *extra, logger="CSVLogger", version="fit"):
    """`lnd fit` of a small ResNet on the digits, 2 training batches, into <save_dir>/run/<version>."""
    return [
        *DIGITS_CLASSIFIER_ARGS,
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.max_epochs=1",
        "--torch_threads=1",
        f"--trainer.logger={logger}",
        f"--trainer.logger.save_dir={save_dir}",
        "--trainer.logger.name=run",
        *([f"--trainer.logger.version={version}"] if version else []),
        *extra,
    ]


def digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def lnd_command():
    lnd = Path(sys.executable).with_name("lnd")
    return [str(lnd)] if lnd.exists() else [sys.executable, "-m", "lightning_nd"]


def lnd_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "LND_TRACEBACK"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_predict_and_rerun_keep_every_file_of_the_fit(tmp_path, caplog):
    main(digits_run(tmp_path))
    run = tmp_path / "run" / "fit"
    fit_files = digests(run)
    assert {"metrics.csv", "config.yaml", "hparams.yaml", "checkpoints/last.ckpt"} <= set(fit_files)  # last.ckpt on
    predict = ["predict", *digits_run(tmp_path)[1:], f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    with caplog.at_level("INFO"):
        main(predict)
    theirs = {k: v for k, v in digests(run).items() if not k.startswith("predict/")}
    assert theirs == fit_files  # byte-identical: metrics.csv, config.yaml, hparams.yaml, checkpoints
    assert (run / "predict" / "predictions.csv").is_file() and (run / "predict" / "config.yaml").is_file()
    summary = caplog.text[caplog.text.index("lnd predict finished"):]
    assert "predictions.pt" in summary and "checkpoint" not in summary and "deploy" not in summary

    first_predict = digests(run / "predict")
    main(predict)  # a second predict moves the first aside
    assert digests(run / "predict.1") == first_predict
    main(digits_run(tmp_path))  # a rerun of the fit (no --ckpt_path): the earlier run moves to fit.1, intact
    kept = digests(tmp_path / "run" / "fit.1")
    assert {k: v for k, v in kept.items() if not k.startswith("predict")} == fit_files
    assert "metrics.csv" in digests(run) and not list(run.glob(LOCK_NAME))  # the lock is gone after the run


def test_resumed_fit_continues_in_the_checkpoints_auto_version(tmp_path):
    main(digits_run(tmp_path, version=None))  # Lightning's version_0
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    main(digits_run(tmp_path, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}", version=None))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["version_0"]  # not a new version_1
    rows = list(csv.DictReader((tmp_path / "run" / "version_0" / "metrics.csv").open()))
    assert sorted({int(r["epoch"]) for r in rows if r.get("val/acc")}) == [0, 1]  # both epochs' rows in one file


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LND_TRACEBACK", raising=False)
    folder = tmp_path / "run" / "fit"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        folder.mkdir(parents=True)
        lock = {"pid": sleeper.pid, "host": os.uname().nodename, "since": time.time(), "command": "lnd fit other"}
        (folder / LOCK_NAME).write_text(json.dumps(lock))
        (folder / "metrics.csv").write_text("theirs\n")
        last = _last_lines(capsys, digits_run(tmp_path))
        assert f"in use by process {sleeper.pid}" in last and "version=" in last.splitlines()[-1]
        assert (folder / "metrics.csv").read_text() == "theirs\n"  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    claim = claim_run_dir(folder, resume=False)  # its owner is gone: stale, taken over; the files moved aside
    assert claim.archived == tmp_path / "run" / "fit.1" and (claim.archived / "metrics.csv").read_text() == "theirs\n"
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    claim.release()
    assert not (folder / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_concurrent_runs_in_one_directory(tmp_path):
    """A real second `lnd fit` into the directory of a running one is refused; the first finishes intact."""
    gate = tmp_path / "gate"
    first = subprocess.Popen(
        [*lnd_command(), *digits_run(tmp_path, "--trainer.callbacks+=tests.test_run_interrupt.Pause",
                                     f"--trainer.callbacks.folder={gate}")],
        cwd=tmp_path, env=lnd_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 240
        while not (gate / "paused").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.5)
        second = subprocess.run([*lnd_command(), *digits_run(tmp_path, "--seed_everything=1")], cwd=tmp_path,
                                env=lnd_env(), capture_output=True, text=True, timeout=300)
    finally:
        (gate / "go").touch()
        _, err = first.communicate(timeout=300)
    assert second.returncode == 2
    cause, fix = second.stderr.strip().splitlines()[-2:]
    assert f"in use by process {first.pid}" in cause and "--trainer.logger.init_args.version" in fix
    assert first.returncode == 0, err[-3000:]
    run = tmp_path / "run" / "fit"
    assert "seed_everything: 0" in (run / "config.yaml").read_text()  # the first run's config, not the second's
    assert not (tmp_path / "run" / "fit.1").exists()


@pytest.mark.slow
def test_wandb_offline_keeps_the_run_in_its_own_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger_config = tmp_path / "wandb.yaml"
    logger_config.write_text((REPO / "configs/loggers/wandb_offline.yaml").read_text().replace("save_dir: runs",
                                                                                                 f"save_dir: {tmp_path}"))
    args = [a for a in digits_run(tmp_path, logger="") if not a.startswith("--trainer.logger")]
    main([*args, "-c", str(logger_config)])
    main([*args, "-c", str(logger_config)])  # a second run: its own directory, nothing shared overwritten
    runs = sorted((tmp_path / "lightning-nd").iterdir())
    assert len(runs) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["lightning-nd", "wandb.yaml"]
    for run in runs:
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        (offline,) = (run / "wandb").glob("offline-run-*")
        assert offline.name.endswith(run.name)  # wandb's own files (media included) inside the run directory
