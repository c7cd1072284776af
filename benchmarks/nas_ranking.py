"""How well do the angle, supernet accuracy, NASWOT and the parameter count rank NAS-Bench-201 cells? (CPU-sized)

The experiment of issue 5. On the ``nb201`` space, two supernets are trained with SPOS path sampling on
Fashion-MNIST padded to 3x32x32, once with the true labels and once with random labels (RLNAS). Over a sample of
cells (drawn from the cells NASLib published zero-cost scores for, so our scores can be compared with theirs) we
compute, and correlate (Kendall tau, Spearman rho) with the benchmark's CIFAR-10 test accuracy:

* the path angle of both supernets (AngleTracker, RLNAS-NB201 convention: conv/linear weights, BN affine, biases;
  skip = nothing, pool = 1/9 kernel, ``none`` drops a path);
* the true-label supernet's accuracy after BN recalibration (SPOS);
* NASWOT v2 and v1 of each path of a freshly initialised supernet (the same width as the trained ones);
* the parameter count of the benchmark network (baseline).

It also reports the benchmark accuracy of each method's pick among the sample (and among the first 100 for NASWOT,
the paper's N=100 setting), the pick of a full EvolutionSearch(metric="angle") over the whole space for each
supernet, and how our NASWOT scores rank the sample compared with NASLib's published ``nwot``/``jacov`` values
(computed on real CIFAR-10 batches and the full C=16, N=5 network).

Usage::

    python benchmarks/nas_ranking.py --quick          # ~3 minutes: tiny budget, 40 cells
    python benchmarks/nas_ranking.py                  # CPU setting used for the README (~30 minutes, 2 cores)
    python benchmarks/nas_ranking.py --gpu            # the paper's setting on CIFAR-10 (needs a GPU, downloads)
    # ablation (results/nas_ranking_ablation.md): random-label supernet only, official affine=False cells
    python benchmarks/nas_ranking.py --labels random --no-naswot --no-affine --C 16 --out /tmp/abl.md

Besides the RLNAS path angle it reports the angle of the cell (choice) weights only, without the fixed layers, and
writes the raw scores next to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_nd.callbacks import AngleTracker, EvolutionSearch
from lightning_nd.datamodules import CIFARDataModule, FashionMNISTDataModule, RandomLabels
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import build_space, naswot_score
from lightning_nd.nas.angle import AngleStats
from lightning_nd.nas.bench import NB201, rank_correlation
from lightning_nd.nas.spaces.nb201 import str_to_arch

ROOT = Path(__file__).resolve().parent
NASLIB = ROOT / "data" / "naslib_zc_nasbench201_sample_flat.csv.gz"  # shipped, provenance in data/PROVENANCE.md


def sample_cells(n: int, seed: int) -> tuple[list[str], dict[str, dict[str, float]]]:
    """``n`` cells from NASLib's published CIFAR-10 sample (shipped in ``benchmarks/data``).

    Raises:
        FileNotFoundError: when the shipped sample is missing (a partial checkout), naming the file.
    """
    if not NASLIB.is_file():
        raise FileNotFoundError(f"{NASLIB} is missing: it ships with the repository (see benchmarks/data/PROVENANCE.md)")
    with gzip.open(NASLIB, "rt") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "cifar10"]
    picks = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    chosen = [rows[int(i)] for i in picks]
    return [r["arch_str"] for r in chosen], {r["arch_str"]: {k: float(r[k]) for k in ("nwot", "jacov")} for r in chosen}


def make_data(args: argparse.Namespace) -> pl.LightningDataModule:
    if args.gpu:
        return CIFARDataModule(batch_size=args.batch_size, download=True, val_size=5000)
    return FashionMNISTDataModule(image_size=32, channels=3, train_subset=args.train_subset, batch_size=args.batch_size)


def train_supernet(args: argparse.Namespace, random_labels: bool, workdir: Path) -> tuple[SupernetModule, AngleTracker, dict]:
    pl.seed_everything(args.seed, workers=True)
    data = make_data(args)
    if random_labels:
        data = RandomLabels(data, seed=args.seed)
    model = SupernetModule(
        "nb201", num_classes=10, space_kwargs={"C": args.C, "N": args.N, "affine": args.affine}, seed=args.seed,
        calib_batches=0,
        optimizer=lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lr_scheduler=None,
    )
    tracker = AngleTracker(every_n_epochs=None, every_n_steps=10**9, include_bn_affine=True, include_bias=True,
                           identity="none", heatmap=False)
    search = EvolutionSearch(metric="angle", dirpath=str(workdir / ("random" if random_labels else "true")),
                             seed=args.seed, resume=False)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
        callbacks=[tracker, search],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    return model, tracker, {"seconds": seconds, "search": search.result, "data": data}


def cell_only_angles(stats: AngleStats, archs: np.ndarray) -> np.ndarray:
    """Path angle over the choice (cell-op) weights only, leaving out the fixed layers (stem, reductions, head).

    The same decomposition as :meth:`AngleStats.path_cos` (public ``blocks``, ``layout.const``,
    ``layout.multiplicity``) without the ``fixed`` term; a path whose every edge is dropped, or that has no
    weights and no pseudo-weights, gets angle 0.
    """
    archs = np.atleast_2d(np.asarray(archs, dtype=np.int64))
    blocks = stats.blocks + stats.layout.const[:, None]
    gathered = blocks[archs + stats.layout.offsets]
    if stats.layout.multiplicity is not None:
        mult = np.asarray(stats.layout.multiplicity(archs), dtype=np.float64)
        totals = np.einsum("nd,ndk->nk", mult, gathered)
    else:
        totals = gathered.sum(axis=1)
    denom = np.sqrt(totals[:, 1] * totals[:, 2])
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, totals[:, 0] / denom, 1.0)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def fixed(loader, num: int) -> list:
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for batch in loader:
            if len(out) >= num:
                break
            out.append(batch)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget (a few minutes)")
    parser.add_argument("--gpu", action="store_true", help="paper setting: CIFAR-10, C=16, N=5, 250 epochs")
    parser.add_argument("--archs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per supernet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--C", type=int, default=8)
    parser.add_argument("--N", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--val-batches", type=int, default=3)
    parser.add_argument("--naswot-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--affine", action=argparse.BooleanOptionalAction, default=True,
                        help="BN affine in the cell ops (--no-affine: the official one-shot supernet)")
    parser.add_argument("--labels", choices=("both", "random"), default="both",
                        help="train both supernets or only the random-label (RLNAS) one")
    parser.add_argument("--naswot", action=argparse.BooleanOptionalAction, default=True, help="compute NASWOT")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, oversubscribed CPU 2 OpenMP threads ran 4x slower)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "nas_ranking.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.archs, args.steps, args.train_subset, args.naswot_batch = 40, 60, 4000, 64
        args.out = args.out.with_name("nas_ranking_quick.md")
    if args.gpu:
        args.C, args.N, args.steps, args.batch_size, args.lr = 16, 5, 250 * 782, 64, 0.025
        args.train_subset, args.calib_batches, args.val_batches = None, 50, None
    torch.set_num_threads(args.threads)
    bench = NB201()
    budget: dict[str, float] = {}
    t0 = time.perf_counter()
    cells, published = sample_cells(args.archs, args.seed)
    archs = [str_to_arch(c) for c in cells]
    print(f"{len(cells)} cells; training supernets C={args.C} N={args.N} affine={args.affine} for {args.steps} steps",
          flush=True)
    scores: dict[str, list[float]] = {}

    # NASWOT on the paths of a freshly initialised supernet (same width), one fixed minibatch for every cell
    if args.naswot:
        start = time.perf_counter()
        dm = make_data(args)
        dm.setup("fit")
        x = torch.cat([b[0] for b in fixed(dm.train_dataloader(), math.ceil(args.naswot_batch / args.batch_size))])
        x = x[: args.naswot_batch]
        torch.manual_seed(args.seed)
        init = build_space("nb201", num_classes=10, C=args.C, N=args.N, affine=args.affine)
        scores["NASWOT v2 (init supernet path)"] = [naswot_score(init, x, 2, arch=a) for a in archs]
        budget["NASWOT v2"] = time.perf_counter() - start
        start = time.perf_counter()
        scores["NASWOT v1 (init supernet path)"] = [naswot_score(init, x, 1, arch=a) for a in archs]
        budget["NASWOT v1"] = time.perf_counter() - start
        print(f"NASWOT done in {budget['NASWOT v2'] + budget['NASWOT v1']:.0f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        searches = {}
        for random_labels in (True, False) if args.labels == "both" else (True,):
            name = "random labels" if random_labels else "true labels"
            model, tracker, info = train_supernet(args, random_labels, Path(tmp))
            budget[f"train ({name})"] = info["seconds"]
            tracker.compute_statistics(model)
            scores[f"angle, {name}"] = tracker.path_angles(archs).tolist()
            scores[f"angle of the cell weights only, {name}"] = cell_only_angles(tracker.stats, np.array(archs)).tolist()
            start = time.perf_counter()
            everything = np.array([str_to_arch(bench.arch_str(i)) for i in range(len(bench))])
            angles = tracker.path_angles(everything)
            budget[f"angle of all 15,625 cells ({name})"] = time.perf_counter() - start
            cell_best = bench.arch_str(int(np.argmax(cell_only_angles(tracker.stats, everything))))
            searches[name] = (info["search"], bench.arch_str(int(np.argmax(angles))), cell_best)
            if not random_labels:
                start = time.perf_counter()
                data = info["data"]
                calib = fixed(data.train_dataloader(), args.calib_batches)
                val = fixed(data.val_dataloader(), args.val_batches or 10**9)
                scores["supernet accuracy (BN recal.), true labels"] = [
                    model.evaluate_arch(a, calib, val, calib_batches=args.calib_batches) for a in archs
                ]
                budget["supernet accuracy"] = time.perf_counter() - start
            print(f"{name}: trained in {info['seconds']:.0f} s", flush=True)
    scores["parameter count"] = [NB201.params(c) for c in cells]
    budget["total"] = time.perf_counter() - t0

    results = {name: bench.correlate(cells, values, name=name) for name, values in scores.items()}
    lines = [
        f"# NAS-Bench-201 ranking experiment ({'quick' if args.quick else 'GPU' if args.gpu else 'CPU'} setting)",
        "",
        f"Supernets: nb201 space C={args.C}, N={args.N}, cell BN affine={args.affine}, {args.steps} SGD steps at batch {args.batch_size} "
        f"(lr {args.lr}) on {'CIFAR-10' if args.gpu else f'Fashion-MNIST padded to 3x32x32 ({args.train_subset} train images)'}; "
        f"{len(cells)} cells sampled (seed {args.seed}) from NASLib's published CIFAR-10 zero-cost sample. "
        f"Supernet accuracy: {args.calib_batches} calibration batches, {args.val_batches} validation batches of "
        f"{args.batch_size}. NASWOT: batch {args.naswot_batch}, paths of an untrained supernet of the same width. "
        "Ground truth: NAS-Bench-201 CIFAR-10 test accuracy (200 epochs).",
        "",
        "| score | cells | Kendall tau | Spearman rho | benchmark acc. of its pick (%) |",
        "|---|---|---|---|---|",
        *[r.row() for r in results.values()],
        "",
        f"Random pick: mean {np.mean([bench.accuracy(c) for c in cells]):.2f}% over the sample.",
        "",
        "| method | benchmark CIFAR-10 acc. of the pick (%) |",
        "|---|---|",
    ]
    for name, (search, exhaustive, cell_best) in searches.items():
        best = search["best"]
        lines.append(f"| EvolutionSearch(angle), {name}: `{best['nb201']['arch_str']}` | {best['nb201']['cifar10']:.2f} |")
        lines.append(f"| exhaustive best angle, {name}: `{exhaustive}` | {bench.accuracy(exhaustive):.2f} |")
        lines.append(f"| exhaustive best cell-weights-only angle, {name}: `{cell_best}` | {bench.accuracy(cell_best):.2f} |")
    for name in [k for k in scores if k.startswith("NASWOT")]:
        first = bench.correlate(cells[:100], scores[name][:100], name=name)
        lines.append(f"| {name}, best of the first {len(first.archs)} sampled | {first.pick[1]:.2f} |")
    if published and args.naswot:
        lines += ["", "Agreement with NASLib's published scores (real CIFAR-10 batches, C=16 N=5 network):", "",
                  "| ours vs published | Kendall tau | Spearman rho |", "|---|---|---|"]
        for ours, theirs in (("NASWOT v2 (init supernet path)", "nwot"), ("NASWOT v1 (init supernet path)", "jacov")):
            pairs = [(s, published[c][theirs]) for c, s in zip(cells, scores[ours])
                     if math.isfinite(s) and math.isfinite(published[c][theirs])]
            tau, rho = rank_correlation(*zip(*pairs))
            lines.append(f"| {ours} vs `{theirs}` | {tau:.3f} | {rho:.3f} |")
        for theirs in ("nwot", "jacov"):
            pub = bench.correlate(cells, [published[c][theirs] for c in cells], name=theirs)
            lines.append(f"| published `{theirs}` vs benchmark accuracy | {pub.kendall:.3f} | {pub.spearman:.3f} |")
    lines += ["", f"Budget (wall seconds, {args.threads} torch thread(s), 2-core CPU shared with other jobs):" if not args.gpu
              else "Budget (wall seconds):", "",
              "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in budget.items()], ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from results_io import write_results

    glance = [{"family": "NAS", "what": f"{r.name} vs NB201 CIFAR-10 acc, Kendall tau ({len(cells)} cells)",
               "value": f"{r.kendall:.3f}", "spread": f"one supernet (seed {args.seed})", "target": "-"}
              for r in results.values()]
    write_results(args.out.stem, text, command="python benchmarks/nas_ranking.py " + " ".join(sys.argv[1:]),
                  glance=glance, out_dir=args.out.parent)
    args.out.with_name(args.out.stem + "_scores.json").write_text(json.dumps({"cells": cells, "scores": scores}))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, math.ceil(len(results) / 2), figsize=(4 * math.ceil(len(results) / 2), 7))
        for ax, r in zip(axes.flat, results.values()):
            x_ = np.array(r.scores, dtype=float)
            ok = np.isfinite(x_)
            ax.scatter(x_[ok], np.array(r.accuracies)[ok], s=6, alpha=0.6)
            ax.set_title(f"{r.name}\ntau {r.kendall:.3f}", fontsize=8)
            ax.set_ylabel("NB201 C10 acc.", fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=80)
    except Exception as err:  # the picture is a bonus; never lose the table for it
        print(f"picture not written: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
