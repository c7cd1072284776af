"""DARTS space: a supernet training step vs the same path's standalone subnet step (target <= 1.1x).

    python benchmarks/darts_speed.py [--quick] [--paths 3] [--threads 1]

For each of ``--paths`` random paths (PathSampler, seed 0), every other input combination and op is masked so that
``SupernetModule``'s own per-step hooks (path sampling + activation, zero-grad->None check) draw exactly that path;
the subnet is ``export_subnet`` of it. Steps of the two alternate and medians are taken, so load changes on a shared
machine hit both alike. Reported: the per-path ratio and its spread over paths, and the supernet's structural
overhead timed alone (its per-step hooks + SGD and zero_grad over all supernet parameters, path gradients only):
the forward/backward of the two run the very same modules, so on a loaded machine the overhead's share of a step is
the steadier number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lightning_nd.modules import SupernetModule
from lightning_nd.nas import PathSampler, decisions, export_subnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nas_core import paired_step_times
from results_io import write_results


def pin_path(net, arch, alive=False):
    """Mask every option but ``arch``'s (``alive=True``: restore the full space)."""
    for d, keep in zip(decisions(net), arch):
        for layer in d.layers:
            layer.alive.fill_(alive)
            layer.alive[keep] = True


def ratio_for_path(model, arch, batch, repeats, size):
    net = model.net
    full = [layer.alive.clone() for d in decisions(net) for layer in d.layers]
    pin_path(net, arch)
    sub = export_subnet(net, arch)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    t_super, t_sub, opt_s = paired_step_times(model, sub, arch, x, y, repeats)
    grads = {p: p.grad for p in net.parameters()}

    def overhead():
        model.on_train_batch_start((x, y), 0)
        model.on_before_optimizer_step(opt_s)
        for p, g in grads.items():
            p.grad = g
        opt_s.step()
        opt_s.zero_grad()

    overhead()
    start = time.perf_counter()
    for _ in range(20):
        overhead()
    t_overhead = (time.perf_counter() - start) / 20
    masks = iter(full)
    for d in decisions(net):
        for layer in d.layers:
            layer.alive.copy_(next(masks))
    return t_super, t_sub, t_overhead


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--paths", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kw = {"C": 8, "layers": 5} if args.quick else {"C": 16, "layers": 8}
    batch, repeats = (32, 10) if args.quick else (64, 10)
    model = SupernetModule("darts", num_classes=10, space_kwargs=kw)
    sampler = PathSampler(model.net, seed=0)
    load = os.getloadavg()
    rows = []
    for p in range(args.paths):
        arch = sampler.sample(10_000 + p)
        t_super, t_sub, t_over = ratio_for_path(model, arch, batch, repeats, 32)
        rows.append((p, t_super, t_sub, t_super / t_sub, t_over))
        print(f"path {p}: supernet {t_super * 1e3:.0f} ms, subnet {t_sub * 1e3:.0f} ms, ratio {t_super / t_sub:.3f}, "
              f"overhead {t_over * 1e3:.1f} ms")
    ratios = np.array([r[3] for r in rows])
    command = f"nice -n 10 python benchmarks/darts_speed.py{' --quick' if args.quick else ''} --paths {args.paths} " \
              f"--threads {args.threads}"
    lines = [
        "# DARTS space: supernet step vs standalone subnet step", "",
        f"Command: `{command}`. Space {kw}, batch {batch}, 3x32x32 input, {repeats} alternating steps per path "
        f"(medians), {args.threads} thread(s); load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f} "
        "(2-core machine shared with other jobs: absolute times are noisy, the ratio is paired).", "",
        "| path | supernet step | subnet step | ratio | structural overhead (share of the subnet step) |",
        "|---|---|---|---|---|",
        *[f"| {p} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | {r:.3f}x | {o * 1e3:.1f} ms ({100 * o / b:.2f} %) |"
          for p, a, b, r, o in rows], "",
        f"Median ratio {np.median(ratios):.3f}x (range {ratios.min():.3f}x-{ratios.max():.3f}x over {len(rows)} "
        "paths); target <= 1.10x.",
    ]
    write_results(
        "darts_speed" + ("_quick" if args.quick else ""), "\n".join(lines) + "\n", command=command,
        glance=[{"family": "NAS core", "what": "DARTS supernet step / standalone subnet step",
                 "value": f"{np.median(ratios):.2f}x",
                 "spread": f"{ratios.min():.2f}x-{ratios.max():.2f}x over {len(rows)} paths", "target": "<= 1.10x"}],
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
