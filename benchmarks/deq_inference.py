"""Where MDEQ-tiny's inference time goes on CPU: the solver-side savings switched off one at a time.

MDEQ-tiny (``deq_fashion.CONFIG_RECIPE``, the config's recipe; untrained weights of each seed: an inference call runs
the forward solver to its cap either way) and the equal-size ResNet classify the first ``--batch`` Fashion-MNIST test
images. In each round every variant and the ResNet are timed in turn (median of ``--calls`` calls), with the minor
page faults per call counted by ``getrusage``; a variant's time is reported as a ratio to the ResNet's in the same
round, median (min-max) over rounds, then over seeds and thread counts. Variants:

- ``default``: what ships;
- ``no value reuse``: the solver does not hand back ``f(z*)``, so the DEQ evaluates the cell once more;
- ``no buffer reuse``: Anderson allocates fresh history buffers on every solve (the pool keeps nothing);
- ``neither``: both off.

    python benchmarks/deq_inference.py --seeds 0 1 2 --threads 1 2
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deq_fashion import CONFIG_RECIPE, RECIPES, SmallResNet, build_mdeq, load_fashion
from results_io import write_results

from lightning_nd.implicit import SOLVERS, register_solver
from lightning_nd.implicit.solvers import _HISTORY

VARIANTS = ("default", "no value reuse", "no buffer reuse", "neither")
WITHOUT_VALUE = "anderson_without_value"  # registered here: Anderson whose stats carry no f(z*)


def _anderson_without_value(f, z0, **kwargs):
    z, stats = SOLVERS["anderson"](f, z0, **kwargs)
    stats.fz = None
    return z, stats


def _configure(net: torch.nn.Module, variant: str) -> None:
    net.deq.config.f_solver = WITHOUT_VALUE if variant in ("no value reuse", "neither") else "anderson"
    _HISTORY.max_idle = 0 if variant in ("no buffer reuse", "neither") else 6
    _HISTORY.idle.clear()


def _time(fn, calls: int) -> tuple[float, float]:
    """Median milliseconds and mean minor page faults per call (after one untimed call)."""
    fn()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
    return 1000 * statistics.median(times), faults


def measure(seed: int, threads: int, images: torch.Tensor, rounds: int, calls: int) -> dict[str, list[dict]]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net = build_mdeq(RECIPES[CONFIG_RECIPE]).eval()
    torch.manual_seed(seed)
    resnet = SmallResNet().eval()
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with torch.no_grad():
        for r in range(rounds):
            for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:  # rotate the order
                _configure(net, variant)
                ms, faults = _time(lambda: net(images), calls)
                ref_ms, _ = _time(lambda: resnet(images), calls)
                rows[variant].append({"ms": ms, "ratio": ms / ref_ms, "faults": faults})
    _configure(net, "default")
    return rows


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--name", default="deq_inference")
    args = parser.parse_args()
    register_solver(WITHOUT_VALUE, _anderson_without_value)
    images = load_fashion("test")[0][: args.batch]
    results = {(s, t): measure(s, t, images, args.rounds, args.calls) for t in args.threads for s in args.seeds}
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        "# MDEQ-tiny inference on CPU: solver-side savings switched off one at a time", "", f"`{command}`", "",
        f"Recipe `{CONFIG_RECIPE}`, batch {args.batch} Fashion-MNIST test images, {args.rounds} rounds x {args.calls} "
        f"calls per variant, seeds {args.seeds}, torch threads {args.threads}. Ratio: inference time / the ResNet's in "
        "the same round; faults: minor page faults per call. Median (min-max) over rounds; the last column pools all "
        "seeds.", "",
        "| variant | " + " | ".join(f"seed {s}, {t} thr." for t in args.threads for s in args.seeds)
        + " | all: ratio | all: faults / call |",
        "|---|" + "---|" * (len(results) + 2),
    ]
    for variant in VARIANTS:
        cells = [spread([row["ratio"] for row in results[key][variant]]) + "x" for key in results]
        ratios = [row["ratio"] for key in results for row in results[key][variant]]
        faults = [row["faults"] for key in results for row in results[key][variant]]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {spread(ratios)}x | {spread(faults, '{:.0f}')} |")
    text = "\n".join(lines)
    print(text)
    write_results(args.name, text, command=command)


if __name__ == "__main__":
    main()
