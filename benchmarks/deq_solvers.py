"""Solver battery: our fixed-point / Anderson / Broyden against torchdeq 0.1.0's, cell by cell (issue 23).

Cells (float32 and float64): linear maps with spectral radius 0.5 / 0.9 / 0.99, the float64 GroupNorm conv cell on
which a wrapping Broyden memory diverged (tests/implicit/helpers.py ``group_norm_problem``), an MDEQ-like GroupNorm
cell (deq.md section 2), the project's ``MDEQCell`` and i-FPN ``PyramidFusionCell`` at initialisation, and tanh conv
cells (one slow: ``SlowConvCell`` radius 0.95). Every solver gets the same flat ``(B, D)`` map and start (z0 = 0),
tolerance and cap; evaluations are counted by wrapping the map, and the converged share is recomputed independently
from the returned iterate (its residual in the stop mode below the tolerance).

Rows per cell and solver: torchdeq (its defaults: Anderson lam 1e-4 absolute, Broyden memory = cap), ours with its
defaults, ours before issue 23 (``lightning_nd/implicit/solvers.py`` at commit ``6fc0d19``, loaded from git: batch-wide
stop and break, Broyden's circular memory of 27), and the variants the defaults were chosen from (Broyden memory 27 /
50 / 100 (default) / the cap; Anderson's relative (default) or absolute lambda, with or without the stall restart). Timing: all variants of one cell alternate within every repetition; the time
ratio against torchdeq (and against the old code) is taken per repetition and reported as the median.

torchdeq is NOT a dependency of lightning-nd: ``pip install torchdeq==0.1.0`` to include it (rows are skipped if not).

    python benchmarks/deq_solvers.py [--reps 5] [--threads 1]
    python benchmarks/deq_solvers.py --batched [--reps 15] [--batch 64]    # batched solves now vs before issue 23
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deq_torchdeq import Cell as MDEQLikeCell  # noqa: E402  (deq.md section 2; the same weights per seed)
from results_io import RESULTS_DIR, _atomic_write, write_results  # noqa: E402

from lightning_nd.implicit import solve  # noqa: E402
from lightning_nd.implicit.ifpn import PyramidFusionCell  # noqa: E402
from lightning_nd.implicit.mdeq import MDEQCell  # noqa: E402
from lightning_nd.implicit.structure import flatten, spec_of, unflatten  # noqa: E402
from tests.implicit.helpers import ConvCell, SlowConvCell, group_norm_problem  # noqa: E402

OLD_COMMIT = "6fc0d19"  # solvers before issue 23
FlatFn = Callable[[torch.Tensor], torch.Tensor]


def _linear(rho: float, dtype: torch.dtype, d: int = 64, b: int = 8) -> tuple[FlatFn, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(rho * 100))
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eig = torch.linspace(-rho, rho, d, dtype=torch.float64)  # symmetric: spectral radius rho exactly
    a = (q @ torch.diag(eig) @ q.T).to(dtype)
    c = torch.randn(b, d, generator=gen, dtype=dtype)
    return (lambda z: z @ a.T + c), torch.zeros(b, d, dtype=dtype)


def _cell_problem(cell: Callable, x, z0) -> tuple[FlatFn, torch.Tensor]:
    spec = spec_of(z0)
    return (lambda v: flatten(cell(unflatten(v, spec), x))), flatten(z0)


def cells() -> list[tuple[str, FlatFn, torch.Tensor, float, str, int]]:
    """(name, flat map, flat start, tol, stop mode, cap) for every cell of the battery."""
    torch.manual_seed(0)
    out = []
    for rho, dtype, tol in ((0.5, torch.float64, 1e-10), (0.9, torch.float32, 1e-4), (0.99, torch.float64, 1e-10)):
        f, z0 = _linear(rho, dtype)
        out.append((f"linear rho {rho} ({str(dtype)[6:]})", f, z0, tol, "abs", 300))
    cell, x = group_norm_problem()
    out.append(("GroupNorm conv, issue 23 point 1 (float64)", *_cell_problem(cell, x, torch.zeros_like(x)), 1e-10,
                "abs", 300))
    gen = torch.Generator().manual_seed(1)
    cell = MDEQLikeCell(16)
    x = 2.0 * torch.randn(8, 16, 8, 8, generator=gen)
    out.append(("MDEQ-like GroupNorm conv (float32)", *_cell_problem(cell, x, torch.zeros_like(x)), 1e-4, "rel", 100))
    cell = MDEQCell([8, 8], expansion=2, groups=4)
    x = torch.randn(8, 8, 12, 12, generator=gen)
    z0 = [torch.zeros(8, *s) for s in cell.state_shapes(12, 12)]
    out.append(("MDEQCell [8, 8] at init (float32)", *_cell_problem(cell, x, z0), 1e-4, "rel", 100))
    cell = PyramidFusionCell(num_levels=3, channels=8, num_groups=4)
    x = tuple(torch.randn(8, 8, s, s, generator=gen) for s in (16, 8, 4))
    z0 = tuple(torch.zeros_like(t) for t in x)
    out.append(("i-FPN PyramidFusionCell, 3 levels (float32)", *_cell_problem(cell, x, z0), 1e-4, "rel", 100))
    cell = SlowConvCell(channels=4, radius=0.95)
    x = 0.5 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out.append(("tanh conv, slow (radius 0.95, float32)", *_cell_problem(cell, x, torch.zeros_like(x)), 1e-5, "abs",
                300))
    cell = ConvCell(channels=4, scale=0.9, dtype=torch.float64)
    x = torch.randn(8, 4, 6, 6, generator=gen, dtype=torch.float64)
    out.append(("tanh conv (scale 0.9, float64)", *_cell_problem(cell, x, torch.zeros_like(x)), 1e-10, "abs", 300))
    return out


def load_old_solvers():
    """lightning_nd/implicit/solvers.py as of OLD_COMMIT, as a module of its own."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:lightning_nd/implicit/solvers.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_solvers.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_solvers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_solvers"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def variants(max_iter: int, old, torchdeq_solver) -> dict[str, tuple[str, Callable]]:
    """name -> (solver family, runner(f, z0, tol, stop_mode, max_iter) -> z)."""

    def ours(name: str, **opts):
        return lambda f, z0, tol, mode, n: solve(name, f, z0, tol=tol, max_iter=n, stop_mode=mode, **opts)[0]

    def old_solver(name: str):
        return lambda f, z0, tol, mode, n: old.solve(name, f, z0, tol=tol, max_iter=n, stop_mode=mode)[0]

    def theirs(name: str):
        solver = torchdeq_solver(name)
        return lambda f, z0, tol, mode, n: solver(f, z0, max_iter=n, tol=tol, stop_mode=mode)[0]

    out = {
        "fixed_point ours": ("fixed_point", ours("fixed_point")),
        "fixed_point old": ("fixed_point", old_solver("fixed_point")),
        "anderson ours": ("anderson", ours("anderson")),
        "anderson ours, absolute lam": ("anderson", ours("anderson", relative_lam=False)),
        "anderson ours, no restart": ("anderson", ours("anderson", restart_after=0)),
        "anderson ours, absolute lam, no restart": ("anderson", ours("anderson", relative_lam=False, restart_after=0)),
        "anderson old": ("anderson", old_solver("anderson")),
        "broyden ours": ("broyden", ours("broyden")),
        "broyden ours, memory 27": ("broyden", ours("broyden", memory=27)),
        "broyden ours, memory 50": ("broyden", ours("broyden", memory=50)),
        "broyden ours, memory = cap": ("broyden", ours("broyden", memory=max_iter)),
        "broyden old": ("broyden", old_solver("broyden")),
    }
    if torchdeq_solver is not None:
        out.update({
            "fixed_point torchdeq": ("fixed_point", theirs("fixed_point_iter")),
            "anderson torchdeq": ("anderson", theirs("anderson")),
            "broyden torchdeq": ("broyden", theirs("broyden")),
        })
    return out


def residual(f: FlatFn, z: torch.Tensor, mode: str) -> torch.Tensor:
    fz = f(z)
    r = (fz - z).norm(dim=1)
    return r if mode == "abs" else r / (fz.norm(dim=1) + 1e-9)


def run_battery(reps: int) -> list[dict]:
    try:
        from torchdeq.solver import get_solver as torchdeq_solver
    except ImportError:
        torchdeq_solver = None
    old = load_old_solvers()
    rows = []
    for cell_name, f, z0, tol, mode, cap in cells():
        runs = variants(cap, old, torchdeq_solver)
        times: dict[str, list[float]] = {k: [] for k in runs}
        result: dict[str, dict] = {}
        with torch.no_grad():
            for rep in range(reps):
                for name, (_, run) in runs.items():
                    calls = 0

                    def counted(v, f=f):
                        nonlocal calls
                        calls += 1
                        return f(v)

                    start = time.perf_counter()
                    z = run(counted, z0.clone(), tol, mode, cap)
                    times[name].append(time.perf_counter() - start)
                    if rep == 0:
                        r = residual(f, z.reshape(z0.shape).to(z0.dtype), mode)
                        result[name] = {"evals": calls, "residual": float(r.nan_to_num(float("inf")).max()),
                                        "converged": float((r < tol).float().mean())}
        for name, (family, _) in runs.items():
            row = {"cell": cell_name, "variant": name, "family": family, "tol": tol, "stop_mode": mode, "cap": cap,
                   **result[name], "time_ms": 1e3 * statistics.median(times[name])}
            for ref in (f"{family} torchdeq", f"{family} old"):
                if ref in times and ref != name:
                    key = "vs_torchdeq" if ref.endswith("torchdeq") else "vs_old"
                    row[key] = statistics.median(a / b for a, b in zip(times[name], times[ref]))
            rows.append(row)
        print(f"done: {cell_name}", flush=True)
    return rows


def verdict(rows: list[dict], variant_suffix: str = "ours") -> list[str]:
    """Per cell and family: where torchdeq converges, do ours converge in <= 1.1x its evaluations and <= its time?"""
    out = []
    by = {(r["cell"], r["variant"]): r for r in rows}
    for (cell, variant), theirs in by.items():
        if not variant.endswith("torchdeq") or theirs["converged"] < 1.0:
            continue
        family = theirs["family"]
        ours = by[(cell, f"{family} {variant_suffix}")]
        ok = ours["converged"] == 1.0 and ours["evals"] <= 1.1 * theirs["evals"] and ours["vs_torchdeq"] <= 1.0
        out.append(f"| {cell} | {family} | {theirs['evals']} | {ours['evals']} | {ours['converged']:.0%} | "
                   f"{ours['vs_torchdeq']:.2f}x | {'yes' if ok else '**no**'} |")
    return out


def markdown(rows: list[dict], reps: int, threads: int) -> str:
    lines = [
        "# DEQ solver battery: ours vs torchdeq 0.1.0 (issue 23)",
        "",
        f"Command: `python benchmarks/deq_solvers.py --reps {reps} --threads {threads}`. Timings: median over {reps} "
        "repetitions, all variants of a cell alternating within each repetition; ratios taken per repetition. "
        "Machine: 2-core AMD EPYC, loaded by other agents, so only the ratios are meaningful. "
        "Converged = share of samples whose residual (recomputed from the returned iterate) is below tol. "
        "`old` = our solvers before issue 23 (commit 6fc0d19).",
        "",
        "## Target: where torchdeq converges, ours (defaults) converge in <= 1.1x its evaluations and <= its time",
        "",
        "| cell | solver | torchdeq evals | our evals | our converged | time ours/torchdeq | met |",
        "|---|---|---|---|---|---|---|",
        *verdict(rows),
        "",
        "## All rows",
        "",
        "| cell | variant | tol (mode) | cap | converged | residual | evals | time ms | vs torchdeq | vs old |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs_t = f"{r['vs_torchdeq']:.2f}x" if "vs_torchdeq" in r else "-"
        vs_o = f"{r['vs_old']:.2f}x" if "vs_old" in r else "-"
        lines.append(f"| {r['cell']} | {r['variant']} | {r['tol']:g} ({r['stop_mode']}) | {r['cap']} | "
                     f"{r['converged']:.0%} | {r['residual']:.2e} | {r['evals']} | {r['time_ms']:.1f} | {vs_t} | "
                     f"{vs_o} |")
    return "\n".join(lines) + "\n"


def batched_vs_old(reps: int, batch: int) -> str:
    """Our solvers now vs before issue 23 on the shipped MDEQ-tiny solve at a training batch: per-sample tracking
    must not cost batched throughput. MDEQCell [16, 16] (expansion 1, groups 4: the config's cell) on 14x14 / 7x7
    states, forward solve as configured (Anderson, 6 evaluations, rel 2e-2) and tighter ones (30 evaluations)."""
    old = load_old_solvers()
    gen = torch.Generator().manual_seed(0)
    cell = MDEQCell([16, 16], expansion=1, groups=4)
    x = torch.randn(batch, 16, 14, 14, generator=gen)
    f, z0 = _cell_problem(cell, x, [torch.zeros(batch, *s) for s in cell.state_shapes(14, 14)])
    lines = [
        f"# Batched solves: ours now / ours before issue 23 (batch {batch})", "",
        f"Command: `python benchmarks/deq_solvers.py --batched --reps {reps} --batch {batch}`. MDEQCell [16, 16] of "
        "configs/implicit/mdeq_tiny_fashion.yaml at initialisation, 14x14 / 7x7 states, no autograd, 1 thread. "
        "Ratio = median over repetitions of (time now / time before), both timed back to back in one process. "
        "Machine: 2-core AMD EPYC, loaded by other agents.", "",
        "| solve | evaluations (now / before) | time now / before [min-max] |", "|---|---|---|",
    ]
    for name, cap, tol in (("anderson", 6, 2e-2), ("anderson", 30, 1e-4), ("broyden", 30, 1e-4),
                           ("fixed_point", 30, 1e-4)):
        ratios, nfe = [], {}
        with torch.no_grad():
            for _ in range(reps):
                times = {}
                for label, module in (("now", None), ("before", old)):
                    run = solve if module is None else module.solve
                    start = time.perf_counter()
                    _, stats = run(name, f, z0.clone(), tol=tol, max_iter=cap, stop_mode="rel")
                    times[label] = time.perf_counter() - start
                    nfe[label] = stats.nfe
                ratios.append(times["now"] / times["before"])
        lines.append(f"| {name}, cap {cap}, rel {tol:g} | {nfe['now']} / {nfe['before']} | "
                     f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="deq_solvers")
    parser.add_argument("--batched", action="store_true", help="only the batched now-vs-before comparison")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.batched:
        md = batched_vs_old(args.reps, args.batch)
        write_results(f"{args.name}_batched", md,
                      command=f"python benchmarks/deq_solvers.py --batched --reps {args.reps} --batch {args.batch}")
        print(md)
        return
    rows = run_battery(args.reps)
    md = markdown(rows, args.reps, args.threads)
    command = f"python benchmarks/deq_solvers.py --reps {args.reps} --threads {args.threads}"
    met = [line.endswith("yes |") for line in verdict(rows)]
    glance = [{"family": "DEQ", "what": "solver battery: cells x solvers where ours meet torchdeq's evaluations "
               "(x1.1) and time", "value": f"{sum(met)}/{len(met)}", "spread": f"median of {args.reps} repetitions",
               "target": "all"}]
    path = write_results(args.name, md, command=command, glance=glance)
    record = json.loads(path.with_suffix(".json").read_text())
    record["rows"] = rows
    _atomic_write(RESULTS_DIR / f"{args.name}.json", json.dumps(record, indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
