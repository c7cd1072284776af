"""The GPU run (``benchmarks/gpu_run.py``, issue 16) on the CPU: its smoke run, and its per-part time caps."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.py"


def run(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.fashion_mnist
@pytest.mark.slow  # ~30 s on an idle 2-core CPU: every part of the GPU run once, at tiny sizes (issue 16 asks CI to)
def test_smoke_run_reports_every_part(tmp_path):
    # --budget 300: caps that hold on a heavily shared CI machine too (the default smoke budget is 150 s)
    proc, wall = run("--smoke", "--budget", "300", "--out", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "gpu_run_smoke.md").read_text()
    record = json.loads((tmp_path / "gpu_run_smoke.json").read_text())
    for part in ("reparam_speed", "deq_speed", "nas", "reparam", "mdeq", "ifpn"):
        assert f"| {part} | done |" in text
    assert record["machine"].startswith("CPU")
    assert record["command"] == f"python benchmarks/gpu_run.py --smoke --budget 300 --out {tmp_path}"
    # each family's measurement is in the report, not only a status
    assert "| angle: " in text and "| NASWOT v2" in text and "EvolutionSearch(metric='angle'" in text
    for variant in ("plain", "acb", "dbb", "repvgg"):
        assert f"| {variant} | 1 |" in text  # trained, fused and checked
    assert "| NO |" not in text  # deploy accuracy == training-form accuracy for every variant
    assert "| fpn |" in text and "| ifpn |" in text and "MDEQ-tiny" in text
    families = {row["family"] for row in record["glance"]}
    assert {"NAS", "Re-parameterization", "Implicit"} <= families
    assert wall < 300, f"the smoke run took {wall:.0f} s"  # ~30 s on an idle 2-core CPU


@pytest.mark.fashion_mnist
def test_a_part_that_overruns_is_stopped_and_the_others_still_report(tmp_path):
    # `reparam` hangs after its first report (fault injection) while `ifpn` runs beside it; reparam's cap is 8 s
    proc, _ = run("--smoke", "--budget", "300", "--parallel", "--parts", "reparam,ifpn", "--overrun", "reparam",
                  "--cap", "reparam=8", "--out", str(tmp_path), timeout=300)  # without the cap it would never end
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # not every part finished
    text = (tmp_path / "gpu_run_smoke.md").read_text()
    assert "| reparam | stopped at its cap (8 s); partial results kept | 8 |" in text
    assert "| ifpn | done |" in text and "| fpn |" in text  # the other part ran to its end and reported
    assert "- data: Fashion-MNIST" in text  # what the stopped part reported before its cap is kept
    assert json.loads((tmp_path / "gpu_run_smoke.json").read_text())["name"] == "gpu_run_smoke"


def test_preflight_names_what_is_missing_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_run import Config
    from gpu_run.runner import preflight

    _, skipped, fatal = preflight(Config(), ["nas"], str(tmp_path / "nowhere"))
    data = [p for p in fatal if "Fashion-MNIST idx files not found" in p]
    assert data and str(tmp_path / "nowhere") in data[0] and "`carry`" in data[0]
    if not torch.cuda.is_available():  # the GPU run refuses to start without a GPU, and says why
        assert any("no CUDA device is visible" in p and "--smoke" in p for p in fatal)
    assert skipped == {}
    # a module missing on the lent machine (pycocotools is not installed there) skips only the part that needs it
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "pycocotools" else find_spec(m, *a))
    _, skipped, _ = preflight(Config.smoke_test(), ["nas", "ifpn"], None)
    assert list(skipped) == ["ifpn"] and "pycocotools" in skipped["ifpn"] and ".device/whl" in skipped["ifpn"]


def test_device_data_is_the_datamodules_data_and_plans_fit_the_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_run.common import DeviceBatches, dataset_to_device, plan_steps

    from lightning_nd.datamodules import DigitsDataModule, RandomLabels

    dm = RandomLabels(DigitsDataModule(image_size=12, resize="pad"), seed=3)
    dm.setup("fit")
    x, y = dataset_to_device(dm.train_dataset, torch.device("cpu"))  # all at once, as the GPU run does
    for i in (0, 7, len(y) - 1):
        xi, yi = dm.train_dataset[i]  # item by item, as a DataLoader does
        torch.testing.assert_close(x[i], xi, rtol=0, atol=1e-6)
        assert y[i] == yi
    xb, yb = next(iter(DeviceBatches(x, y, 16, channels=3)))
    assert xb.shape == (16, 3, 12, 12) and torch.equal(xb[:, 0], xb[:, 2]) and yb.shape == (16,)
    # steps planned from a timed calibration: whole epochs when the time binds, max_steps when it does not
    assert plan_steps(30, per_step=0.01, seconds_left=100, steps_per_epoch=429, max_steps=None) == 22 * 429
    assert plan_steps(30, per_step=0.01, seconds_left=100, steps_per_epoch=429, max_steps=3500) == 3500
    assert plan_steps(30, per_step=0.01, seconds_left=10, steps_per_epoch=429, max_steps=3500) == 2 * 429
    assert plan_steps(30, per_step=1.0, seconds_left=1, steps_per_epoch=429, max_steps=None) == 30


def test_budget_schedule_skips_the_first_steps_and_replans_when_steps_slow_down(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from types import SimpleNamespace

    from gpu_run import common

    clock = [0.0]  # a fake clock: each step advances it by the step's "duration"
    monkeypatch.setattr(common, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    schedule = common.BudgetSchedule(deadline=100.0, steps_per_epoch=10, calib_steps=5, calib_from=2)
    trainer = SimpleNamespace(global_step=0, should_stop=False, optimizers=[SimpleNamespace(param_groups=[{"lr": 0.1}])])
    schedule.on_train_start(trainer, None)
    lrs = []
    for _ in range(20):  # epochs, as Lightning runs them: the epoch ends early once should_stop is set
        schedule.on_train_epoch_start(trainer, None)
        for _ in range(10):
            schedule.on_train_batch_start(trainer, None, None, 0)
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            # 2 slow first steps (a GPU loads kernels), then 1 s per step, then 2 s from step 10 (the device is shared)
            clock[0] += 5.0 if trainer.global_step < 2 else 1.0 if trainer.global_step < 10 else 2.0
            trainer.global_step += 1
            schedule.on_train_batch_end(trainer, None, None, None, 0)
            if trainer.should_stop:
                break
        schedule.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            break
    # planned from steps 2-4 only (1 s each): 82 more steps fit in the 87 s left, rounded down to whole epochs; timing
    # from step 0 would have planned 30
    assert schedule.plans[0] == 80
    # the slow-down is seen at the epoch ends: the run ends at its new plan, before the deadline, with the cosine at 0
    assert trainer.global_step == 50 and schedule.total_steps == 50 and not schedule.stopped_by_deadline
    assert clock[0] <= 100.0 and lrs[-1] < 0.01 * 0.1 and len(schedule.epoch_times) == 5


def test_parts_are_spawned_when_a_forked_process_cannot_initialise_cuda(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_run.runner import start_method

    def poisoned() -> None:  # what torch raises in a forked child once the parent initialised the CUDA driver
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", poisoned)
    assert start_method("cuda") == "spawn"  # the forked probe failed: spawned parts initialise CUDA themselves
    assert start_method("cpu") == "fork"  # no probe on the CPU
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    assert start_method("cuda") == "fork"
