"""One prepared GPU run (issue 16): each family's claims at the largest scale the offline data allows, in < 8 min.

Parts (each under its own time cap; a part that overruns is stopped and loses only itself; results are rewritten
atomically after every change, so a stopped run still leaves a report):

* ``reparam_speed``, ``deq_speed`` (first, alone on the device): RepVGG-A0 training form vs deploy form at 224 px
  (bf16, float32, and torch.compile'd when it compiles in time); MDEQ-tiny vs ResNet training step and peak memory.
* ``nas``: nb201 supernet C=16, N=5 on random labels of full Fashion-MNIST (32x32), trained for as many steps as
  its budget allows; Kendall tau of the angle (every NB201 AngleTracker preset, with and without the fixed layers)
  and of NASWOT against the NAS-Bench-201 table on 1,000 cells (the angle also on all 15,625); EvolutionSearch's
  pick and its percentile.
* ``reparam``: plain vs ACB vs DBB vs RepVGG-style CNN on full Fashion-MNIST, 3 seeds, deploy acc == train acc.
* ``mdeq``: MDEQ-tiny vs an equal-size ResNet on full Fashion-MNIST (accuracy, time per epoch, peak memory).
* ``ifpn``: i-FPN vs FPN RetinaNet on 128 px shapes, equal initial weights of every shared module.

Training parts run side by side on the GPU after the timing parts; bf16 autocast on the GPU.

Usage::

    python benchmarks/gpu_run.py --smoke                    # CPU, tiny sizes, < 1 min: the same code paths
    python benchmarks/gpu_run.py --out benchmarks/results   # on a GPU: writes gpu_run.md / gpu_run.json there

On the lent machine (the device tool: one NVIDIA H200, 15 minutes of device time in all, no network). The working
tree is copied there, but not the Fashion-MNIST files (~30 MiB) nor pycocotools (not installed there). Here, once::

    mkdir -p .device/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .device/fashion-mnist/
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .device/whl pycocotools

(``.device/`` is ignored by git.) Then one call of the device tool's ``run`` with ``carry: [".device"]``,
``timeout_s: 600`` and the command::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl; \\
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py --out $OUT 2>&1 | tee $OUT/log.txt

The results (``gpu_run.md``, ``gpu_run.json``, ``log.txt``) come back under the reply's ``files_at``; copy
``gpu_run.md`` and ``gpu_run.json`` into ``benchmarks/results/``. The project needs no install there: this script
finds ``lightning_nd`` (and its ``callbacks``/``datamodules`` folders) in the working tree.
"""

from __future__ import annotations

import os
import sys
import time

STARTED = time.monotonic()
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # the parent asks for the GPU without a CUDA context,
# so that the parts it forks can each create their own

import argparse  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import lightning_nd.callbacks
except ModuleNotFoundError:  # not installed (the lent machine): use the working tree's folders
    sys.path.insert(1, str(HERE.parent))
    import lightning_nd

    lightning_nd.__path__.append(str(HERE.parent))  # lightning_nd.callbacks -> callbacks/, .datamodules -> datamodules/

from gpu_run import PARTS, Config  # noqa: E402
from gpu_run.runner import Runner, preflight  # noqa: E402


def parse_caps(items: list[str]) -> dict[str, float]:
    caps = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds:
            raise SystemExit(f"--cap {item!r}: expected PART=SECONDS with PART in {list(PARTS)}")
        caps[name] = float(seconds)
    return caps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, under a minute (what CI runs)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda; cpu with --smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results; a temporary folder with --smoke)")
    parser.add_argument("--name", default=None, help="results file stem (default gpu_run, gpu_run_smoke)")
    parser.add_argument("--data-dir", default=None, help="folder of the four Fashion-MNIST idx files")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    parser.add_argument("--budget", type=float, default=None, help="wall seconds for the whole run (default 460)")
    parser.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="a part's hard cap")
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="training parts side by side on the device (default: yes on the GPU, no with --smoke)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per part (default 4; 1 smoke)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing row")
    parser.add_argument("--start-method", choices=("auto", "fork", "spawn"), default="auto",
                        help="how parts start (auto: fork, unless a forked process cannot initialise CUDA)")
    parser.add_argument("--overrun", default="", help=argparse.SUPPRESS)  # tests: parts that ignore their budget
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; allowed: {list(PARTS)}")
    cfg = Config.smoke_test() if args.smoke else Config()
    overrides = {"caps": parse_caps(args.cap), "overrun": tuple(p for p in args.overrun.split(",") if p)}
    if args.device:
        overrides["device"] = args.device
    if args.budget:
        overrides["budget_s"] = args.budget
    if args.parallel is not None:
        overrides["parallel"] = args.parallel
    if args.threads:
        overrides["threads"] = args.threads
    if args.no_compile:
        overrides["compile"] = False
    overrides["start_method"] = args.start_method
    cfg, skipped, fatal = preflight(cfg.with_(**overrides), parts, args.data_dir)
    if fatal:
        for problem in fatal:
            print(f"gpu_run: {problem}", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_run_smoke_")) if args.smoke else HERE / "results")
    name = args.name or ("gpu_run_smoke" if args.smoke else "gpu_run")
    command = "python benchmarks/gpu_run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    runner = Runner(cfg, parts, out, name, command.strip(), STARTED)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run stops its parts (finally blocks)
    runner.run(skipped)
    path = out / f"{name}.md"
    print(path.read_text())
    print(f"results: {path} and {path.with_suffix('.json')} ({runner.elapsed():.0f} s)")
    return 0 if all(s == "done" for s in runner.status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
