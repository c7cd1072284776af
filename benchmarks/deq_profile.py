"""Where an MDEQ-tiny training step spends its time: cell evaluations, adjoint products, solver arithmetic, norms, Python.

The model of ``benchmarks/deq_fashion.py`` (MDEQ-tiny, batch 64 of 28x28 Fashion-MNIST images) is first trained for
``--train-steps`` steps with the chosen recipe (so the cell is past its untrained, barely contractive state), then
``--profile-steps`` training steps and as many inference calls are recorded with ``torch.profiler``. Time is split by
``record_function`` labels put around the solver calls and the evaluations handed to them (this script wraps the
solver registry; the library is unchanged):

- forward solve: cell evaluations under ``no_grad`` vs the solver's own arithmetic (Anderson mixing, residuals);
- backward (adjoint) solve: vector-Jacobian products vs the solver's arithmetic;
- the rest: stem, the one tracked cell application, the head, the loss and the backprop through all of them;
- by operator: convolutions, GroupNorm, the small linear solves of Anderson, other ops; "Python / dispatch" is the
  step's wall time not covered by any operator's own time.

It also writes the mean residual curve per solver iteration (forward and backward, relative residual, worst and mean
sample) of the trained model: the data the tolerances and caps of the fast recipe were chosen from.

It ends with the per-evaluation cost of the cell in channels-last layout and under ``torch.compile`` (``--compile``,
which takes minutes to compile on a small CPU), timed interleaved with the eager cell. Last, the ways of computing
a row of Anderson's Gram matrix, timed against each other.

    python benchmarks/deq_profile.py [--recipes baseline fast] [--train-steps 150] [--profile-steps 8] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deq_fashion import RECIPES, build_mdeq, fashion_batches
from results_io import write_results

import lightning_nd.implicit.solvers as solvers_module

_in_backward = [False]  # set around loss.backward(): solver calls made then are adjoint solves


@contextmanager
def labelled_solvers():
    """Wrap every registered solver so its calls and the evaluations handed to it carry profiler labels."""
    originals = dict(solvers_module.SOLVERS)

    def wrap(fn):
        def solver(f, z0, **kw):
            outer, inner = ("adjoint solve", "adjoint VJPs") if _in_backward[0] else ("forward solve", "forward cell evals")

            def evaluate(v):
                with record_function(inner):
                    return f(v)

            with record_function(outer):
                return fn(evaluate, z0, **kw)

        return solver

    for name, fn in originals.items():
        solvers_module.SOLVERS[name] = wrap(fn)
    try:
        yield
    finally:
        solvers_module.SOLVERS.clear()
        solvers_module.SOLVERS.update(originals)


def train_step(net, opt, images, labels, jac):
    _in_backward[0] = False
    logits = net(images)
    loss = F.cross_entropy(logits, labels)
    if jac is not None and net.deq.jac_loss is not None:
        loss = loss + jac * net.deq.jac_loss
    opt.zero_grad(set_to_none=True)
    _in_backward[0] = True
    loss.backward()
    _in_backward[0] = False
    opt.step()


def residual_curves(stats) -> tuple[list[float], list[float]]:
    trace = stats.rel_trace
    return trace.mean(0).tolist(), trace.max(0).values.tolist()


def profile_recipe(name: str, args: argparse.Namespace) -> tuple[list[str], torch.nn.Module]:
    """Train MDEQ-tiny with recipe ``name`` for a while, then profile training steps and inference calls."""
    torch.manual_seed(args.seed)
    recipe = RECIPES[name]
    net = build_mdeq(recipe)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    batches = fashion_batches(64, args.train_steps + 3 * args.profile_steps + 2, seed=args.seed)
    jac = recipe["jac"]
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        images, labels = next(batches)
        net.deq.mode = "unrolled" if step < recipe["warmup_steps"] else "equilibrium"
        net.deq.jac_reg = bool(jac and jac.active(step, 0))
        net.deq.f_max_iter_delta = jac.cap_delta(step, 0) if jac else 0
        net.deq.jac_probe_seed = jac.probe_seed(step) if jac else None
        train_step(net, opt, images, labels, jac.weight_at(step) if net.deq.jac_reg else None)
    train_s = time.perf_counter() - t0
    net.deq.mode, net.deq.jac_reg, net.deq.f_max_iter_delta = "equilibrium", False, 0
    fwd_curves, bwd_curves, nfe = [], [], []
    step_wall, eval_wall = [], []
    with labelled_solvers(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.profile_steps):  # the schedule goes on: regularised steps are part of the average
            step = args.train_steps + i
            images, labels = next(batches)
            net.deq.jac_reg = bool(jac and jac.active(step, 0))
            net.deq.f_max_iter_delta = jac.cap_delta(step, 0) if jac else 0
            net.deq.jac_probe_seed = jac.probe_seed(step) if jac else None
            t = time.perf_counter()
            with record_function("train step"):
                train_step(net, opt, images, labels, jac.weight_at(step) if net.deq.jac_reg else None)
            step_wall.append(time.perf_counter() - t)
            st = net.deq.last_stats
            fwd_curves.append(residual_curves(st.forward))
            bwd_curves.append(residual_curves(st.backward) if st.backward is not None else ([], []))
            nfe.append((st.forward.nfe, st.backward.nfe if st.backward is not None else 0))
        net.deq.jac_reg, net.deq.f_max_iter_delta = False, 0
        net.eval()
        with torch.no_grad():
            for _ in range(args.profile_steps):
                images, _ = next(batches)
                t = time.perf_counter()
                with record_function("inference"):
                    net(images)
                eval_wall.append(time.perf_counter() - t)
    # fixed-point reuse: the same batch evaluated twice (MDEQ(reuse_fixed_point=True))
    images, _ = next(batches)
    net.reuse_fixed_point = True
    with torch.no_grad():
        t = time.perf_counter()
        net(images)
        cold_ms, cold_nfe = 1000 * (time.perf_counter() - t), net.deq.last_stats.forward.nfe
        t = time.perf_counter()
        net(images)
        warm_ms, warm_nfe = 1000 * (time.perf_counter() - t), net.deq.last_stats.forward.nfe
    net.reuse_fixed_point, net._last = False, None
    net.train()
    lines = [
        f"## Recipe `{name}`",
        "",
        recipe["note"],
        "",
        f"Trained {args.train_steps} steps first ({train_s:.0f} s). Solver evaluations per profiled step (forward / "
        "backward): " + ", ".join(f"{f}/{b}" for f, b in nfe)
        + f". Median step {1000 * statistics.median(step_wall):.0f} ms, inference "
        f"{1000 * statistics.median(eval_wall):.0f} ms (wall, under the profiler). Same batch evaluated twice with "
        f"`reuse_fixed_point=True`: {cold_nfe} then {warm_nfe} forward evaluations ({cold_ms:.0f} ms, {warm_ms:.0f} ms).",
        "",
        *summarise(prof, step_wall, eval_wall, args.profile_steps),
        "",
        "Residual curves of the trained model (relative residual per solver iteration, over the profiled steps):",
        "",
        *curve_table(fwd_curves, bwd_curves),
        "",
    ]
    return lines, net


def time_cell_variants(net: torch.nn.Module, compile_cell: bool, repeats: int) -> list[str]:
    """Median time of one cell evaluation (no grad) and one VJP for the eager cell, channels-last, torch.compile."""
    images = next(fashion_batches(64, 1, seed=123))[0]
    cell = net.cell
    cell.eval()
    with torch.no_grad():
        x = net.stem.eval()(images)
        z = [t.normal_() for t in net.initial_state(x)]
    variants = {"eager (contiguous)": (cell, x, z)}
    variants["channels-last tensors"] = (
        cell, x.contiguous(memory_format=torch.channels_last), [t.contiguous(memory_format=torch.channels_last) for t in z])
    compile_s = None
    if compile_cell:
        compiled = torch.compile(cell, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(z, x)
        zg = [t.clone().requires_grad_() for t in z]
        torch.autograd.grad(sum(o.sum() for o in compiled(zg, x)), zg)
        compile_s = time.perf_counter() - t0
        variants["torch.compile (inductor)"] = (compiled, x, z)
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in variants}
    for _ in range(repeats):  # interleaved, so load swings hit every variant alike
        for key, (fn, xi, zi) in variants.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                fn(zi, xi)
                times[key][0].append(time.perf_counter() - t0)
            zg = [t.clone().requires_grad_() for t in zi]
            t0 = time.perf_counter()
            out = fn(zg, xi)
            torch.autograd.grad(out, zg, [torch.ones_like(o) for o in out])
            times[key][1].append(time.perf_counter() - t0)
    base_f, base_b = (statistics.median(v) for v in times["eager (contiguous)"])
    out = [
        "## Cheaper cell evaluations: channels-last and torch.compile",
        "",
        f"One cell evaluation of the trained MDEQ-tiny cell (batch 64), median of {repeats} interleaved repeats "
        f"({torch.get_num_threads()} torch thread(s)); `vjp` = a tracked evaluation plus its vector-Jacobian product "
        "(what each adjoint step costs)." + (f" Compilation took {compile_s:.0f} s." if compile_s is not None else
                     " torch.compile not timed in this run (`--compile`)."),
        "",
        "| variant | eval ms | x eager | eval + vjp ms | x eager |",
        "|---|---|---|---|---|",
    ]
    for key, (fw, bw) in times.items():
        f, b = statistics.median(fw), statistics.median(bw)
        out.append(f"| {key} | {1000 * f:.2f} | {f / base_f:.2f}x | {1000 * b:.2f} | {b / base_b:.2f}x |")
    cell.train()
    net.stem.train()
    return out


def time_gram_variants(net: torch.nn.Module, repeats: int, batch: int = 64, filled: int = 5) -> list[str]:
    """Median time of one Anderson Gram row (the newest residual against ``filled`` stored ones), four ways."""
    d = sum(c * h * w for c, h, w in net.cell.state_shapes(14, 14))  # 28x28 images after the stride-2 stem
    G = torch.randn(batch, 6, d)
    stored, newest = G[:, :filled], G[:, filled - 1]
    variants = {
        "(1, D) x (D, filled) matmul per sample (used)": lambda: (newest[:, None] @ stored.transpose(1, 2))[:, 0],
        "torch.linalg.vecdot (used before)": lambda: torch.linalg.vecdot(stored, newest[:, None]),
        "(filled, D) x (D, 1) bmm (used first)": lambda: torch.bmm(stored, newest[:, :, None])[..., 0],
        "broadcast product summed in float64 (tol < 1e-4)": lambda: (stored * newest[:, None]).sum(-1, dtype=torch.float64),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats * 10):  # interleaved
        for key, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(variants))])
    out = [
        "",
        "## Anderson's Gram row",
        "",
        f"One row of the Gram matrix of the residuals (batch {batch}, D = {d} per sample, {filled} stored residuals), "
        f"median of {repeats * 10} interleaved repeats ({torch.get_num_threads()} torch thread(s)).",
        "",
        "| variant | us | x used |",
        "|---|---|---|",
    ]
    for key, ts in times.items():
        t = statistics.median(ts)
        out.append(f"| {key} | {1e6 * t:.0f} | {t / base:.2f}x |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["baseline", "fast"], choices=sorted(RECIPES))
    parser.add_argument("--train-steps", type=int, default=150, help="training steps before profiling")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the cell (minutes)")
    parser.add_argument("--repeats", type=int, default=30, help="repeats of the cell-variant timings")
    parser.add_argument("--name", default="deq_profile", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        "# Where an MDEQ-tiny step spends its time",
        "",
        f"`{command}`: MDEQ-tiny (benchmarks/deq_fashion.py), batch 64 of 28x28 Fashion-MNIST, {args.threads} torch "
        f"thread(s), each recipe trained {args.train_steps} steps, then {args.profile_steps} training steps and "
        f"{args.profile_steps} inference calls under torch.profiler. **2-core CPU shared with other jobs**: absolute "
        "times are noisy; the shares within a table are the result.",
        "",
    ]
    net = None
    for name in args.recipes:
        section, net = profile_recipe(name, args)
        lines += section
    lines += time_cell_variants(net, args.compile, args.repeats)
    lines += time_gram_variants(net, args.repeats)
    text = "\n".join(lines)
    print(text)
    write_results(args.name, text, command=command)


def summarise(prof, step_wall: list[float], eval_wall: list[float], n: int) -> list[str]:
    """Category table (inclusive times of the labels) and operator table (self times), per training step."""
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1000.0 / n for e in events}  # ms per step, inclusive
    self_ms: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key.startswith("aten::") or e.key.startswith("mkldnn"):
            self_ms[e.key] += e.self_cpu_time_total / 1000.0 / n
    step = total.get("train step", 0.0)
    infer = total.get("inference", 0.0)
    # the labels' inclusive times include both the training steps and the inference calls; split them by the
    # inference-only run of the forward solve (no adjoint there)
    rows = [
        ("forward solve (inclusive, train + inference)", total.get("forward solve", 0.0)),
        ("  cell evaluations under no_grad", total.get("forward cell evals", 0.0)),
        ("  solver arithmetic (mixing, residuals, bookkeeping)",
         total.get("forward solve", 0.0) - total.get("forward cell evals", 0.0)),
        ("adjoint solve (train only)", total.get("adjoint solve", 0.0)),
        ("  vector-Jacobian products", total.get("adjoint VJPs", 0.0)),
        ("  solver arithmetic", total.get("adjoint solve", 0.0) - total.get("adjoint VJPs", 0.0)),
    ]
    ops = {
        "convolution (fwd + bwd)": sum(v for k, v in self_ms.items() if "conv" in k),
        "GroupNorm / BatchNorm (fwd + bwd)": sum(v for k, v in self_ms.items() if "norm" in k and "linalg" not in k),
        "Anderson linear solves (linalg)": sum(v for k, v in self_ms.items() if "linalg" in k),
        "matmul / bmm / einsum": sum(v for k, v in self_ms.items() if any(s in k for s in ("mm", "matmul", "einsum"))),
    }
    all_ops = sum(self_ms.values())
    ops["other operators (elementwise, copies, reductions)"] = all_ops - sum(ops.values())
    ops["Python / dispatch (wall not covered by any operator)"] = step + infer - all_ops
    out = [
        "### By phase (ms per training step; inclusive, profiler clock)",
        "",
        f"Training step {step:.1f} ms, inference call {infer:.1f} ms (per call, profiler clock).",
        "",
        "| phase | ms / step | share of train step + inference |",
        "|---|---|---|",
    ]
    out += [f"| {name} | {ms:.1f} | {100 * ms / (step + infer):.0f} % |" for name, ms in rows]
    out += [
        "",
        "### By operator (self time, ms per training step + inference call)",
        "",
        "| operator group | ms | share |",
        "|---|---|---|",
    ]
    out += [f"| {name} | {ms:.1f} | {100 * ms / (step + infer):.0f} % |" for name, ms in ops.items()]
    top = sorted(self_ms.items(), key=lambda kv: -kv[1])[:12]
    out += ["", "Top operators by self time (ms per step + inference): "
            + ", ".join(f"`{k}` {v:.1f}" for k, v in top) + "."]
    return out


def curve_table(fwd: list, bwd: list) -> list[str]:
    def mean_curve(curves, idx):
        length = max((len(c[idx]) for c in curves), default=0)
        cols = []
        for i in range(length):
            vals = [c[idx][i] for c in curves if len(c[idx]) > i]
            cols.append(statistics.mean(vals))
        return cols

    fm, fx, bm, bx = mean_curve(fwd, 0), mean_curve(fwd, 1), mean_curve(bwd, 0), mean_curve(bwd, 1)
    n = max(len(fm), len(bm))
    out = ["| iteration | forward rel (mean) | forward rel (worst) | adjoint rel (mean) | adjoint rel (worst) |",
           "|---|---|---|---|---|"]
    cell = lambda xs, i: f"{xs[i]:.2e}" if i < len(xs) else "-"  # noqa: E731
    out += [f"| {i + 1} | {cell(fm, i)} | {cell(fx, i)} | {cell(bm, i)} | {cell(bx, i)} |" for i in range(n)]
    return out


if __name__ == "__main__":
    main()
