"""lightning_nd.implicit.DEQ side by side with torchdeq 0.1.0 on the same cell, solver and tolerance.

Measures per solver: forward+backward wall time per training step, forward steps to tolerance, the worst per-sample
residual, the gradient's cosine and norm ratio against backprop through 200 unrolled iterations, and activation
memory (bytes of tensors saved for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``) against an
explicit weight-tied network unrolled to the same depth as the forward solve.

Timing: the two libraries alternate within every repetition (so both see the same machine load); the ratio is
taken per repetition (ours / torchdeq) and reported as the median with its min-max over the repetitions.

Anderson is run twice. Our default scales the Tikhonov lambda by the mean squared residual (``relative_lam=True``);
torchdeq (and locuslab/deq) use a fixed lambda = 1e-4. "same lambda" runs ours with ``relative_lam=False`` (the
same algorithm as torchdeq's); "each default" runs each library's own default rule, so that ratio mixes the
implementation with the regularisation rule (ours converges in fewer steps on this cell).

torchdeq is NOT a dependency of lightning-nd: ``pip install torchdeq==0.1.0`` to run this script.

    python benchmarks/deq_torchdeq.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results

from lightning_nd.implicit import DEQ

# (row name, our solver, our solver options, torchdeq solver); torchdeq runs with its defaults (Anderson lam=1e-4)
CONFIGS = (
    ("fixed_point", "fixed_point", {}, "fixed_point_iter"),
    ("anderson, same lambda", "anderson", {"relative_lam": False, "lam": 1e-4}, "anderson"),
    ("anderson, each default", "anderson", {}, "anderson"),
    ("broyden", "broyden", {}, "broyden"),
)


class Cell(nn.Module):
    """MDEQ-like conv cell of deq.md section 2: z <- GN(ReLU(z + GN(conv(ReLU(GN(conv(z)))) + x)))."""

    def __init__(self, c: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn1, self.gn2, self.gn3 = nn.GroupNorm(groups, c), nn.GroupNorm(groups, c), nn.GroupNorm(groups, c)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(z)))))
        return self.gn3(F.relu(z + y + x))


def saved_bytes(fn) -> tuple[int, torch.Tensor]:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def grad_of(cell: nn.Module, run, target: torch.Tensor) -> torch.Tensor:
    for p in cell.parameters():
        p.grad = None
    F.mse_loss(run(), target).backward()
    return torch.cat([p.grad.reshape(-1) for p in cell.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CPU smoke run)")
    parser.add_argument("--max-iter", type=int, default=40)
    parser.add_argument("--inject", type=float, default=2.0, help="scale of the random injection (convergence speed)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--name", default="deq_torchdeq", help="results file stem under benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 9
    torch.manual_seed(0)
    try:
        from torchdeq import get_deq
    except ImportError as err:
        raise SystemExit("torchdeq is not installed: pip install torchdeq==0.1.0 (benchmark only)") from err

    cell = Cell()
    x = args.inject * torch.randn(8, 16, 16, 16)  # injection scale 2: fixed-point iteration misses tol in 40 steps
    target = torch.randn_like(x)
    z0 = torch.zeros_like(x)
    n, tol = args.max_iter, args.tol
    ref = grad_of(cell, lambda: _unroll(cell, x, 200), target)
    rows = []
    for row_name, ours_name, options, theirs_name in CONFIGS:
        ours = DEQ(cell, f_solver=ours_name, b_solver=ours_name, f_max_iter=n, b_max_iter=n, f_tol=tol, b_tol=1e-6,
                   f_solver_kwargs=options, b_solver_kwargs=options)
        theirs = get_deq(f_solver=theirs_name, b_solver=theirs_name, f_max_iter=n, b_max_iter=n, f_tol=tol,
                         b_tol=1e-6, f_stop_mode="abs", b_stop_mode="abs", ift=True)
        info_box, bwd_box = {}, {}

        def run_theirs(theirs=theirs, info_box=info_box, bwd_box=bwd_box):
            out, info = theirs(lambda z: cell(z, x), z0, backward_writer=bwd_box.update)
            info_box.update(info)
            return out[-1]

        def run_ours(ours=ours):
            return ours(x)

        times = {"ours": [], "torchdeq": []}
        for _ in range(reps):
            for key, fn in (("ours", run_ours), ("torchdeq", run_theirs)):
                t0 = time.perf_counter()
                grad_of(cell, fn, target)
                times[key].append(time.perf_counter() - t0)
        ratios = [a / b for a, b in zip(times["ours"], times["torchdeq"])]
        mem_ours = saved_bytes(run_ours)[0]
        mem_theirs = saved_bytes(run_theirs)[0]
        g_ours, g_theirs = grad_of(cell, run_ours, target), grad_of(cell, run_theirs, target)  # fresh stats
        fwd, bwd = ours.last_stats.forward, ours.last_stats.backward
        for key, g, mem, steps, res, bsteps in (
            ("ours", g_ours, mem_ours, fwd.nfe, float(fwd.abs.max()), bwd.nfe),
            ("torchdeq", g_theirs, mem_theirs, int(info_box["nstep"].max()), float(info_box["abs_lowest"].max()),
             int(bwd_box["nstep"].max())),
        ):
            rows.append(
                {
                    "solver": row_name,
                    "impl": key,
                    "ms": 1e3 * statistics.median(times[key]),
                    "ratio": statistics.median(ratios) if key == "ours" else 1.0,
                    "spread": (min(ratios), max(ratios)) if key == "ours" else None,
                    "steps": steps,
                    "bsteps": bsteps,
                    "abs": res,
                    "cos": float(F.cosine_similarity(g, ref, dim=0)),
                    "norm": float(g.norm() / ref.norm()),
                    "mem": mem / 2**20,
                }
            )
    explicit = saved_bytes(lambda: _unroll(cell, x, n))[0] / 2**20
    command = f"python benchmarks/deq_torchdeq.py{' --quick' if args.quick else ''} --threads {args.threads}"
    lines = [
        "# DEQ vs torchdeq 0.1.0",
        "",
        f"Command: `{command}` (torchdeq 0.1.0 installed for the benchmark only). Machine: shared CPU, timings "
        "noisy; compare the paired ratios, not the absolute times.",
        "",
        f"Cell: MDEQ-like conv cell, C=16, 16x16, batch 8, injection {args.inject} x N(0, 1); forward cap {n}, abs tol "
        f"{tol} (per sample, worst over the batch); backward cap {n}, abs tol 1e-6; exact implicit gradient (torchdeq "
        f"`ift=True`). {reps} repetitions, the libraries alternating within each; ms = median; ratio = median of the "
        "per-repetition ratios ours / torchdeq [min-max]. Gradient reference: backprop through 200 unrolled "
        "iterations. Anderson \"same lambda\": ours with `relative_lam=False, lam=1e-4` = torchdeq's rule; \"each "
        "default\": ours scales lambda by the mean squared residual (our default), torchdeq keeps lambda = 1e-4.",
        "",
        "| solver | impl | fwd+bwd ms | ratio vs torchdeq [min-max] | fwd steps | worst abs residual | bwd steps "
        "| grad cos | grad norm ratio | saved activations MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" + (f" [{r['spread'][0]:.2f}-{r['spread'][1]:.2f}]" if r["spread"] else "")
        lines.append(
            f"| {r['solver']} | {r['impl']} | {r['ms']:.1f} | {ratio} | {r['steps']} | {r['abs']:.2e} | {r['bsteps']} "
            f"| {r['cos']:.5f} | {r['norm']:.4f} | {r['mem']:.2f} |"
        )
    by = {(r["solver"], r["impl"]): r for r in rows}
    anderson = by[("anderson, each default", "ours")]
    lines += ["", f"Explicit weight-tied network unrolled to the same depth ({n} layers): {explicit:.2f} MiB of saved "
              f"activations (DEQ: {anderson['mem']:.2f} MiB, {explicit / anderson['mem']:.0f}x less)."]
    text = "\n".join(lines)
    print(text)

    def glance(row: str, what: str) -> dict[str, str]:
        r = by[(row, "ours")]
        return {"family": "DEQ", "what": what, "value": f"{r['ratio']:.2f}x",
                "spread": f"{r['spread'][0]:.2f}x-{r['spread'][1]:.2f}x over {reps} paired repeats, "
                          f"{args.threads} thread(s), shared CPU",
                "target": "<= 1.0x"}

    write_results(args.name, text, command=command, glance=[
        glance("anderson, same lambda", "Anderson fwd+bwd time vs torchdeq 0.1.0, same lambda rule (implementation)"),
        glance("anderson, each default", "Anderson fwd+bwd time vs torchdeq 0.1.0, each library's default lambda"),
    ])


def _unroll(cell: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    z = torch.zeros_like(x)
    for _ in range(n):
        z = cell(z, x)
    return z


if __name__ == "__main__":
    main()
