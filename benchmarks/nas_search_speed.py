"""Search-side costs: angle scoring after one statistics pass, NASWOT per architecture, EA split across DDP ranks.

Three measurements of issue 5, each against its own baseline in the same run:

1. scoring 1000 nb201 architectures by angle (``AngleTracker.path_angles``) after one statistics pass, vs the
   statistics pass itself (target: <= 1 s for the 1000 on a CPU);
2. NASWOT v2 (and v1) per architecture at batch 128 on the benchmark's nb201 network (C=16, N=5), vs one plain
   training-mode forward of the same network;
3. the wall time of ``EvolutionSearch(metric="accuracy")`` on 2 DDP ranks (``ddp_spawn``, CPU) vs 1 process.

Usage::

    python benchmarks/nas_search_speed.py --quick
    python benchmarks/nas_search_speed.py
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_nd.callbacks import AngleTracker, EvolutionSearch
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import build_space, naswot_score
from lightning_nd.nas.bench import NB201
from lightning_nd.nas.sampler import uniform_archs


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def angle_scoring(repeats: int) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    net = build_space("nb201", num_classes=10)  # C=16, N=5
    tracker = AngleTracker.from_reference(net, net.state_dict(), include_bn_affine=True, include_bias=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    archs = uniform_archs(np.random.default_rng(0), [list(range(5))] * 6, 1000)
    stats = best_of(lambda: tracker.compute_statistics(net), repeats)
    score = best_of(lambda: tracker.path_angles(archs).tolist(), repeats)
    params = sum(p.numel() for p in net.parameters())
    return [
        (f"statistics pass, nb201 C=16 N=5 ({params / 1e6:.2f} M parameters)", f"{stats * 1e3:.1f} ms"),
        ("angle of 1000 architectures after it", f"{score * 1e3:.2f} ms ({score / 1000 * 1e6:.2f} us/arch)"),
    ]


def naswot_cost(batch: int, cells: int) -> list[tuple[str, str]]:
    bench = NB201()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows, forward, v2, v1 = [], [], [], []
    for cell in bench.sample(cells, seed=1, connected_only=True):
        net = NB201.build(cell, num_classes=10)

        def plain(net=net):
            with torch.no_grad():
                net.train()
                net(x)

        forward.append(best_of(plain, 1))
        v2.append(best_of(lambda net=net: naswot_score(net, x, 2), 1))
        v1.append(best_of(lambda net=net: naswot_score(net, x, 1), 1))
    rows.append((f"one training-mode forward, batch {batch} (baseline, mean of {cells} cells)", f"{np.mean(forward):.2f} s"))
    rows.append((f"NASWOT v2 per architecture, batch {batch}", f"{np.mean(v2):.2f} s ({np.mean(v2) / np.mean(forward):.2f}x forward)"))
    rows.append((f"NASWOT v1 per architecture, batch {batch}", f"{np.mean(v1):.2f} s ({np.mean(v1) / np.mean(forward):.2f}x forward)"))
    return rows


def _search(devices: int, folder: Path, ea: dict) -> float:
    pl.seed_everything(0)
    module = SupernetModule("nb201", num_classes=10, space_kwargs={"C": 4, "N": 1}, calib_batches=0,
                            optimizer=functools.partial(torch.optim.SGD, lr=0.0))  # same weights on 1 and 2 ranks
    search = EvolutionSearch(metric="accuracy", calib_batches=2, val_batches=2, dirpath=str(folder), resume=False, **ea)
    strategy = "ddp_spawn_find_unused_parameters_true" if devices > 1 else "auto"
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[search])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, image_size=16, channels=3))
    return json.loads((folder / "arch.json").read_text())


def ddp_split(ea: dict) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        one = _search(1, Path(tmp) / "one", ea)
        two = _search(2, Path(tmp) / "two", ea)
    same = one["top_k"] == two["top_k"]
    evals = one["evaluated"]
    return [
        (f"EvolutionSearch(accuracy), {evals} candidates, 1 process", f"{one['seconds']:.1f} s"),
        (f"same on 2 DDP ranks (ddp_spawn, CPU); same result: {same}", f"{two['seconds']:.1f} s "
         f"(ratio 2 ranks / 1 = {two['seconds'] / one['seconds']:.2f})"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the single process (DDP ranks get cores // ranks from Lightning)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ea = {"population": 20, "top_k": 5, "mutations": 5, "crossovers": 5, "generations": 2 if args.quick else 5}
    rows = angle_scoring(2 if args.quick else 5)
    rows += naswot_cost(128, 2 if args.quick else 5)
    rows += ddp_split(ea)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
