"""NAS core benchmarks: supernet vs standalone step time, AngleTracker overhead, path-angle cost, ABS shrink step.

    python benchmarks/nas_core.py [--quick] [--out benchmarks/results/nas_core.md]

Ratios are measured against a baseline timed in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from lightning_nd.callbacks import AngleTracker, ProgressivePruner
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import ArchCost, CostConstraint, PathSampler, alive_options, build_space, export_subnet, set_alive
from lightning_nd.nas.sampler import uniform_archs
from lightning_nd.nas.spaces import NB201_OPS


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def perturb(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def paired_step_times(model, sub, arch, x, y, repeats):
    """Median seconds of one ``SupernetModule`` training step (its per-step hooks: path sampling + activation,
    fwd/bwd, zero-grad->None check, SGD) and of one step of ``sub`` (the path as a standalone network: fwd/bwd, SGD),
    and the supernet's optimizer. Every op but ``arch``'s must be masked, so the sampler's draw *is* that path. Steps
    alternate between the two and medians are taken, so load changes on a shared machine hit both alike."""
    net = model.net
    opt_s = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    opt_b = torch.optim.SGD(sub.parameters(), lr=0.01, momentum=0.9)
    trainer = SimpleNamespace(global_step=0, strategy=None)
    model.trainer = trainer  # the hooks read only trainer.global_step (and the strategy when check_sync=True)

    def supernet_step():
        model.on_train_batch_start((x, y), 0)
        opt_s.zero_grad()
        F.cross_entropy(net(x), y).backward()
        model.on_before_optimizer_step(opt_s)
        opt_s.step()
        trainer.global_step += 1

    def subnet_step():
        opt_b.zero_grad()
        F.cross_entropy(sub(x), y).backward()
        opt_b.step()

    for _ in range(2):  # warm-up (and the Choice shape check)
        supernet_step(), subnet_step()
    assert model.current_arch == list(arch)
    t_super, t_sub = [], []
    for i in range(repeats):
        pair = ((supernet_step, t_super), (subnet_step, t_sub))
        for fn, acc in pair if i % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return float(np.median(t_super)), float(np.median(t_sub)), opt_s


def step_times(quick):
    """A ``SupernetModule`` training step vs the same NB-201 path as a standalone network (:func:`paired_step_times`;
    the supernet runs its full sampling code on a space masked down to that path), and the per-step hooks alone."""
    kw = {"C": 8, "N": 2} if quick else {"C": 16, "N": 5}
    batch, repeats = (32, 40) if quick else (64, 30)
    model = SupernetModule("nb201", num_classes=10, space_kwargs=kw)
    net = model.net
    arch = [3, 2, 3, 4, 3, 1]
    for d, keep in enumerate(arch):
        for op in range(len(NB201_OPS)):
            if op != keep:
                set_alive(net, d, op, False)
    sub = export_subnet(net, arch)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    t_super, t_sub, opt_s = paired_step_times(model, sub, arch, x, y, repeats)
    t_hooks = timed(lambda: (model.on_train_batch_start((x, y), 0), model.on_before_optimizer_step(opt_s)), 200)
    for d in range(len(arch)):  # the full space again for the angle measurements below
        for op in range(len(NB201_OPS)):
            set_alive(net, d, op, True)
    return net, t_super, t_sub, t_hooks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: OpenMP threads do not spin against other jobs on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    load_before = os.getloadavg()

    net, t_super, t_sub, t_hooks = step_times(args.quick)
    rows.append(("supernet step / standalone subnet step (nb201)", f"{t_super * 1e3:.1f} ms / {t_sub * 1e3:.1f} ms",
                 f"{t_super / t_sub:.2f}x", "<= 1.10x"))
    rows.append(("SupernetModule per-step hooks (sample + activate + zero-grad check)", f"{t_hooks * 1e6:.0f} us",
                 f"{100 * t_hooks / t_sub:.2f} % of a subnet step", "-"))

    ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    perturb(net)
    tracker = AngleTracker.from_reference(net, ref)
    t_stats = timed(lambda: tracker.compute_statistics(net), 3)
    steps_per_epoch = 782  # CIFAR-10 at batch 64: the default interval is one epoch
    rows.append(("AngleTracker statistics pass / epoch (782 steps)", f"{t_stats * 1e3:.1f} ms",
                 f"{100 * t_stats / (steps_per_epoch * t_super):.3f} %", "<= 1 %"))

    archs = uniform_archs(np.random.default_rng(0), PathSampler(net).options(), 10000)
    t_paths = timed(lambda: tracker.path_angles(archs), 5)
    rows.append(("path angle after the statistics pass (nb201, 10k paths)", f"{t_paths * 1e3:.2f} ms",
                 f"{t_paths / len(archs) * 1e6:.2f} us/path", "<= 5 us"))

    mkw = {"width_mult": 0.25, "input_size": 32} if args.quick else {"input_size": 224}
    mnet = build_space("mobilenet", num_classes=1000, **mkw)
    mref = {n: p.detach().clone() for n, p in mnet.named_parameters()}
    perturb(mnet)
    mtracker = AngleTracker.from_reference(mnet, mref, identity="eye")
    t0 = time.perf_counter()
    mtracker.compute_statistics(mnet)
    t_mstats = time.perf_counter() - t0
    marchs = uniform_archs(np.random.default_rng(0), PathSampler(mnet).options(), 10000)
    t_mpaths = timed(lambda: mtracker.path_angles(marchs), 5)
    rows.append(("path angle (mobilenet, 21 decisions, 10k paths)", f"{t_mpaths * 1e3:.2f} ms",
                 f"{t_mpaths / len(marchs) * 1e6:.2f} us/path", "<= 5 us"))
    cost = ArchCost(mnet, (3, mkw["input_size"], mkw["input_size"]))
    limit = 600e6 if not args.quick else float(np.median(cost.flops_many(marchs)))
    pruner = ProgressivePruner(drop_per_step=7, paths_per_op=1000)
    pruner.constraint = CostConstraint(cost, flops_range=(None, limit))
    def shrink():
        scores = pruner.score_ops(mtracker.stats, mnet, np.random.default_rng(0))
        return pruner.select_ops_to_drop(scores, alive_options(mnet))

    t_shrink = timed(shrink, 1)
    rows.append(("ABS shrink step (mobilenet, 147 ops x 1000 paths, FLOPs-feasible)", f"{t_shrink:.2f} s",
                 f"+ {t_mstats:.2f} s statistics pass", "<= 2 s"))

    load = f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    lines = ["| measurement | time | result | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    table = "\n".join(lines)
    print(table)
    print(load)
    if args.out:
        mode = "quick (nb201 C=8 N=2 batch 32; mobilenet x0.25 at 32 px)" if args.quick else \
            "full (nb201 C=16 N=5 batch 64; mobilenet x1.0 at 224 px)"
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_io import write_results

        out = Path(args.out)
        ratio = next(c for a, _, c, _ in rows if a.startswith("supernet step"))
        write_results(
            out.stem,
            f"# NAS core benchmarks\n\nMode: {mode}. Machine: 2-core CPU shared with other jobs ({load}), "
            f"{args.threads} torch thread(s), torch {torch.__version__}.\n\n{table}\n",
            command="python benchmarks/nas_core.py " + " ".join(sys.argv[1:]),
            glance=[{"family": "NAS core", "what": f"supernet step / standalone subnet step ({mode.split(' ')[0]})",
                     "value": ratio, "spread": "one run of this mode (2-core CPU shared with other jobs)",
                     "target": "<= 1.10x"}],
            out_dir=out.parent,
        )

if __name__ == "__main__":
    main()
