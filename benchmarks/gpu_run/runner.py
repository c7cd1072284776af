"""Run the parts under their caps and keep the results file current.

Every part runs in a forked child process (the parent imported torch and the project once, so a child starts in
milliseconds and never imports again; spawned instead when a forked probe cannot initialise CUDA) in its own
session, so that a part that overruns its cap is killed with everything it started and loses only itself. The
timing parts run first, one at a time, alone on the device; then the training parts run side by side
(``parallel``) or one after another. Whatever a part reported so far is kept when it is stopped; the results file
(markdown + JSON, ``results_io.write_results``) is rewritten atomically whenever a part's record changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from results_io import write_results

from gpu_run import PARTS, Config
from gpu_run.common import DATA_ENV, PartContext, fashion_dir, unpack

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


def preflight(cfg: Config, parts: list[str], data_dir: str | None) -> tuple[Config, dict[str, str], list[str]]:
    """Check the device, the data and the modules up front. Returns the config (with the data folder), the parts
    skipped with the reason and fix, and fatal problems (each with its fix)."""
    fatal, skipped = [], {}
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():  # NVML-based check: no CUDA context here
        fatal.append("no CUDA device is visible. This command is the GPU run: on the lent machine check "
                     "`nvidia-smi`; here use `--smoke` (CPU, tiny sizes) or `--device cpu` (full sizes, hours).")
    folder, looked = fashion_dir(data_dir)
    if folder is None:
        fatal.append(
            "Fashion-MNIST idx files not found (looked in: " + ", ".join(map(str, looked)) + "). Fix: copy "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz into .device/fashion-mnist/ (ignored by git; from Debian's "
            "dataset-fashion-mnist: /usr/share/datasets/fashion-mnist) and name `.device` in the device tool's "
            f"`carry`, or pass --data-dir / set {DATA_ENV}.")
    for name in parts:
        missing = [m for m in PARTS[name].needs if importlib.util.find_spec(m) is None]
        if missing:
            skipped[name] = (f"skipped: Python module(s) {', '.join(missing)} missing. Fix: carry their wheels in "
                             f".device/whl (`pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d "
                             f".device/whl {' '.join(missing)}`) and install them first, as benchmarks/gpu_run.py's "
                             "docstring shows.")
    return cfg.with_(data_dir=folder), skipped, fatal


def unpacked(cfg: Config, work: Path) -> Config:
    """The config reading the idx files uncompressed from ``work`` (decompressed once, before any part starts)."""
    return cfg.with_(data_dir=unpack(cfg.data_dir, work / "fashion-mnist"))


def _probe_cuda() -> None:
    try:
        torch.cuda.init()
    except BaseException:  # e.g. "Cannot re-initialize CUDA in forked subprocess"
        os._exit(1)
    os._exit(0)


def start_method(device: str, timeout: float = 60.0) -> str:
    """``fork`` when a forked child can initialise CUDA (or the run is on the CPU), else ``spawn``.

    The parent never initialises CUDA itself: ``PYTORCH_NVML_BASED_CUDA_CHECK`` makes ``torch.cuda.is_available``
    count devices through NVML. But where NVML fails, torch falls back to ``cudaGetDeviceCount``, which initialises
    the driver here, and every forked part would then fail at its first CUDA call; a forked probe (a second or so)
    finds out before any part starts, and the parts are then spawned (each imports everything again, seconds).
    """
    if not device.startswith("cuda"):
        return "fork"
    if torch.cuda.is_initialized():
        return "spawn"
    probe = multiprocessing.get_context("fork").Process(target=_probe_cuda, daemon=True)
    probe.start()
    probe.join(timeout)
    if probe.exitcode is None:
        probe.kill()
        probe.join()
    if probe.exitcode == 0:
        return "fork"
    print(f"gpu_run: a forked process could not initialise CUDA (exit code {probe.exitcode}): the parts are "
          "spawned instead", file=sys.stderr)
    return "spawn"


def _child(name: str, cfg: Config, path: Path, deadline: float) -> None:
    os.setsid()  # its own process group: a kill at the cap takes everything it started
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the runner, even if it is killed outright
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ctx = PartContext(name, cfg, path, deadline)
    try:
        ctx.record["device"] = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU"
        ctx.report()
        PARTS[name].run(ctx)
    except BaseException as err:  # recorded for the report; the runner marks the part failed
        ctx.record["error"] = f"{type(err).__name__}: {err}"
        ctx.record["traceback"] = traceback.format_exc()[-4000:]
        ctx.report()
        os._exit(1)
    os._exit(0)


class Runner:
    """Starts, watches, stops and reports parts; ``status[name]`` is one of pending / running / done / failed /
    stopped at its cap / skipped."""

    def __init__(self, cfg: Config, parts: list[str], out_dir: Path, name: str, command: str, started: float) -> None:
        self.parts, self.out_dir, self.name, self.command = parts, out_dir, name, command
        self.started = started
        self.work = Path(tempfile.mkdtemp(prefix="gpu_run_parts_"))
        self.cfg = unpacked(cfg, self.work)
        self.status: dict[str, str] = dict.fromkeys(parts, "pending")
        self.caps: dict[str, float] = {}
        self.walls: dict[str, float] = {}
        self.records: dict[str, dict[str, Any]] = {p: {} for p in parts}
        # fork: a part starts in milliseconds with everything imported. Only if a forked process cannot use CUDA
        # (something initialised it in this process) fall back to spawn, which imports everything again per part.
        self.start_method = start_method(self.cfg.device) if cfg.start_method == "auto" else cfg.start_method
        self.context = multiprocessing.get_context(self.start_method)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self, skipped: dict[str, str]) -> None:
        try:
            self._run(skipped)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _run(self, skipped: dict[str, str]) -> None:
        for name, why in skipped.items():
            self.status[name] = why
        todo = [p for p in self.parts if self.status[p] == "pending"]
        for p in [p for p in todo if PARTS[p].alone]:
            self._run_group([p], {p: self.cfg.caps.get(p, self.cfg.alone_caps.get(p, 30.0))})
        training = [p for p in todo if not PARTS[p].alone]
        if self.cfg.parallel:
            window = self.cfg.budget_s - self.elapsed() - self.cfg.final_s
            self._run_group(training, {p: self.cfg.caps.get(p, window) for p in training})
        else:
            for i, p in enumerate(training):
                window = self.cfg.budget_s - self.elapsed() - self.cfg.final_s
                share = PARTS[p].weight / sum(PARTS[q].weight for q in training[i:])
                self._run_group([p], {p: self.cfg.caps.get(p, window * share)})
        self.write()

    def _run_group(self, names: list[str], caps: dict[str, float]) -> None:
        procs, starts = {}, {}
        for name in names:
            cap = max(1.0, caps[name])
            self.caps[name] = cap
            path = self.work / f"{name}.json"
            deadline = time.monotonic() + max(0.5, cap - self.cfg.grace_s)
            starts[name] = time.monotonic()
            procs[name] = self.context.Process(target=_child, args=(name, self.cfg, path, deadline), daemon=False)
            procs[name].start()
            self.status[name] = "running"
        try:
            self._watch(names, procs, starts)
        finally:  # an interrupted run (Ctrl-C, SIGTERM) leaves no part running in its own session
            for name, proc in procs.items():
                self._kill(proc)
                self.status[name] = "interrupted: the run was stopped"
            if procs:
                self.write()

    def _watch(self, names: list[str], procs: dict[str, Any], starts: dict[str, float]) -> None:
        seen: dict[str, float] = {}
        while procs:
            time.sleep(0.2)
            for name in list(procs):
                proc, wall = procs[name], time.monotonic() - starts[name]
                if proc.exitcode is None and wall > self.caps[name]:
                    self._kill(proc)
                    self.status[name] = f"stopped at its cap ({self.caps[name]:.0f} s); partial results kept"
                elif proc.exitcode is not None:
                    self.status[name] = "done" if proc.exitcode == 0 else "failed"
                else:
                    continue
                proc.join()
                self.walls[name] = wall
                del procs[name]
            changed = False
            for name in names:  # keep the file current: rewrite whenever a record changed
                path = self.work / f"{name}.json"
                if path.is_file() and path.stat().st_mtime != seen.get(name):
                    seen[name] = path.stat().st_mtime
                    self.records[name] = json.loads(path.read_text())
                    changed = True
            if changed or not procs:
                self.write()

    @staticmethod
    def _kill(proc: Any) -> None:
        try:  # SIGKILL at once: a SIGTERM would only let Lightning turn it into an exception worth nothing here
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # gone already, or killed before its setsid
            pass
        proc.kill()

    def device(self) -> str:
        names = {r.get("device") for r in self.records.values() if r.get("device")}
        return ", ".join(sorted(names)) or ("CPU" if self.cfg.device == "cpu" else "device not reached")

    def write(self) -> Path:
        from gpu_run.report import markdown

        device = self.device()
        glance = []
        for name in self.parts:
            fn = PARTS[name].glance
            if fn is not None and self.records[name]:
                try:
                    glance += fn(self.records[name], device)
                except (KeyError, TypeError, ValueError, IndexError) as err:  # a partial record: no glance row yet
                    print(f"{name}: no glance row from its partial record ({err})", file=sys.stderr)
        machine_line = f"{device}; {os.cpu_count()} CPU cores; torch {torch.__version__}"
        return write_results(self.name, markdown(self, device), command=self.command, glance=glance,
                             machine_line=machine_line, out_dir=self.out_dir)
