"""Rank tables of the convergence signal against its controls (issue 24): does the angle rank NAS-Bench-201 cells
better than the parameter count and than the supernet's own accuracy?

Per seed, two supernets are trained exactly as the quickstart's (``configs/quickstart.yaml``: C=8 N=1 one-shot
nb201, embedded digits at 16x16, SGD, 8 epochs, ``--seed_everything S``, one torch thread) without shrinking and
without the search: once on the quickstart's random labels and once on the true labels (the only change). The
AngleTracker records the official RLNAS-NB201 vector (preset ``rlnas_nb201``; its reference holds the cells-only
vector's weights too). On each seed's two final checkpoints, scored against NB201 CIFAR-10 test accuracy:

* ``params``: the parameter count of the standalone cell (no training);
* ``angle official`` / ``angle cells-only``: the RLNAS-NB201 path angle (preset defaults) and the quickstart's
  cells-only angle, for the random-label and the true-label supernet;
* ``angle cells-only (random) + params``: the sum of both ranks, each scaled to [0, 1];
* ``supernet accuracy``: the true-label supernet's validation accuracy of the path (true labels) after BN
  recalibration (``SupernetModule.evaluate_arch`` on ``EvolutionSearch``'s fixed seeded batches: the quickstart
  model's 5 calibration batches of 64, the whole 359-image validation split). At about 0.25 s a cell on this CPU it
  is computed on the 200-cell sample only (all 15,625 cells would take about an hour per seed).

All 15,625 cells: Kendall tau-b, mean accuracy of the top 1,000 cells, tau inside groups of equal parameter count
(weighted by group size). 200 cells (``NB201.sample(200, seed=0)``, the sample of ``search_quality.py
--corr-seeds``): Kendall tau-b and Spearman rho (torchmetrics), for every score including supernet accuracy. Paired
per-seed differences of tau with a two-sided 95 % t-interval. Each seed's numbers are cached in
``<out>/ranks_s<S>.json`` (delete it to recompute); the supernet runs in ``<out>/<labels>_labels/s<S>_t1``.

Usage::

    python benchmarks/search_quality_ranks.py --seeds 0 1 2 --out /tmp/h24/ranks --name search_quality_ranks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_stats import rank_summary, t_interval, unit_ranks
from results_io import machine, write_results
from search_quality import fit_config, load_supernet, nb201_cells, recipe_config

LABELS = ("random", "true")
SAMPLE = 200
TOP_K = 1000
PARAMS = "params (no training)"
COMBINED = "angle cells-only, random labels + params (rank sum)"
ACCURACY = "supernet accuracy, true labels (BN recal.)"
QUICKSTART_ANGLE = "angle cells-only, random labels"  # what the quickstart shrinks by


def supernet_config(labels: str) -> dict:
    """The quickstart's config without ProgressivePruner and EvolutionSearch; ``labels="true"`` drops RandomLabels.

    The AngleTracker keeps the quickstart's schedule but records the full official vector (a superset of the
    cells-only one) and draws no heatmaps; it only observes, so the training is the quickstart's.

    Raises:
        ValueError: for labels other than ``"random"`` or ``"true"``.
    """
    if labels not in LABELS:
        raise ValueError(f"labels={labels!r} is not supported; allowed: {', '.join(map(repr, LABELS))}")
    config = recipe_config("quickstart")
    tracker = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("AngleTracker"))
    tracker["init_args"] = {**tracker["init_args"], "cells_only": False, "heatmap": False}
    config["trainer"]["callbacks"] = [tracker]
    if labels == "true":
        config["data"] = config["data"]["init_args"]["datamodule"]
    return config


def train(labels: str, seed: int, out: Path) -> tuple[Path, float]:
    """Train (or reuse) one supernet; returns its final checkpoint and the wall seconds of its fit."""
    folder = out / f"{labels}_labels" / f"s{seed}_t1"
    ckpts = sorted(folder.rglob("*.ckpt"))
    if not ckpts or not (folder / "wall.json").is_file():
        fit_config(supernet_config(labels), folder, seed, threads=1, what=f"{labels}-label supernet")
        ckpts = sorted(folder.rglob("*.ckpt"))
    return ckpts[-1], json.loads((folder / "wall.json").read_text())["wall_s"]


def angles(model: object, state: dict, archs: np.ndarray) -> dict[str, np.ndarray]:
    """Official (preset defaults) and cells-only RLNAS-NB201 path angles of ``archs`` against the run's reference."""
    from lightning_nd.callbacks import AngleTracker

    out = {}
    for name, cells_only in (("official", False), ("cells-only", True)):
        tracker = AngleTracker(preset="rlnas_nb201", cells_only=cells_only)
        tracker.load_state_dict(state)
        tracker.compute_statistics(model)
        out[name] = tracker.path_angles(archs)
    return out


def supernet_accuracy(model: object, seed: int, archs: np.ndarray) -> np.ndarray:
    """Validation accuracy (true labels, %) of each path after BN recalibration, EvolutionSearch's protocol."""
    from lightning_nd.callbacks.evolution_search import fixed_batches
    from lightning_nd.datamodules import DigitsDataModule

    config = supernet_config("true")
    dm = DigitsDataModule(**config["data"]["init_args"])
    dm.setup("fit")
    calib_batches = model.calib_batches
    calib = fixed_batches(dm.train_dataloader, calib_batches, seed)
    val = fixed_batches(dm.val_dataloader, None, seed)
    return np.array([100 * model.evaluate_arch(a, calib, val, calib_batches=calib_batches) for a in archs.tolist()])


def seed_record(seed: int, out: Path) -> dict:
    """All scores of one seed on all cells and on the 200-cell sample (cached in ``<out>/ranks_s<seed>.json``)."""
    cache = out / f"ranks_s{seed}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch

    from lightning_nd.nas.bench import NB201, rank_correlation

    torch.set_num_threads(1)
    bench = NB201()
    acc, archs, params = nb201_cells()
    sample = np.array([bench.index(c) for c in bench.sample(SAMPLE, seed=0)])
    seconds: dict[str, float] = {}
    scores: dict[str, np.ndarray] = {PARAMS: params}
    models = {}
    for labels in LABELS:
        ckpt, seconds[f"train {labels} labels"] = train(labels, seed, out)
        start = time.perf_counter()
        model, state = load_supernet(ckpt)
        for vector, value in angles(model, state, archs).items():
            scores[f"angle {vector}, {labels} labels"] = value
        seconds[f"angles {labels} labels (all cells)"] = time.perf_counter() - start
        models[labels] = model

    scores[COMBINED] = unit_ranks(scores[QUICKSTART_ANGLE]) + unit_ranks(params)
    start = time.perf_counter()
    sample_scores = {name: value[sample] for name, value in scores.items()}
    sample_scores[ACCURACY] = supernet_accuracy(models["true"], seed, archs[sample])
    seconds[f"supernet accuracy ({SAMPLE} cells)"] = time.perf_counter() - start
    groups = np.round(params, 6)
    record = {
        "seed": seed, "seconds": seconds,
        "all_cells": {name: rank_summary(value, acc, groups, TOP_K) for name, value in scores.items()},
        "sample": {}, "sample_scores": {name: value.tolist() for name, value in sample_scores.items()},
        "sample_index": sample.tolist(),
    }
    for name, value in sample_scores.items():
        tau, rho = rank_correlation(value, acc[sample])
        record["sample"][name] = {"tau": tau, "rho": rho, "within_tau": rank_summary(value, acc[sample],
                                                                                      groups[sample])["within_tau"],
                                  "pick": float(acc[sample][int(np.argmax(value))])}
    cache.write_text(json.dumps(record, indent=1))
    return record


def paired_rows(records: list[dict], table: str, pairs: list[tuple[str, str]]) -> list[dict]:
    """Per-seed ``tau(a) - tau(b)`` in ``table`` ("all_cells" or "sample") with a 95 % t-interval."""
    rows = []
    for a, b in pairs:
        diff = np.array([r[table][a]["tau"] - r[table][b]["tau"] for r in records])
        rows.append({"a": a, "b": b, "table": table, "seeds": [r["seed"] for r in records], "diffs": diff.tolist(),
                     "mean": float(diff.mean()), "ci95": t_interval(diff) if len(diff) > 1 else [np.nan, np.nan],
                     "wins": int((diff > 0).sum())})
    return rows


def fmt(values: list[float], digits: int = 3) -> str:
    v = np.array(values, dtype=float)
    return "n/a" if np.isnan(v).all() else f"{np.nanmean(v):.{digits}f} +- {np.nanstd(v):.{digits}f}"


def report(records: list[dict], command: str) -> tuple[str, list[dict], dict]:
    seeds = [r["seed"] for r in records]
    names = list(records[0]["all_cells"])
    angle_names = [n for n in names if n.startswith("angle") and "+" not in n]
    lines = [
        "# Rank tables: the angle against parameter count and supernet accuracy (NAS-Bench-201 CIFAR-10)", "",
        f"Command: `{command}`. Seeds {', '.join(map(str, seeds))} ({len(seeds)} seeds), one torch thread, under "
        "`nice -n 10` on a 2-core AMD EPYC loaded by other agents. Per seed: two supernets trained exactly as the "
        "quickstart's (8 epochs, C=8 N=1, embedded digits 16x16, `--seed_everything S`) without shrinking and "
        "without the search, on the quickstart's random labels and on the true labels. `official`: the RLNAS-NB201 "
        "angle (preset `rlnas_nb201`, its defaults); `cells-only`: the quickstart's angle. Supernet accuracy: the "
        "true-label supernet, each path's validation accuracy on the true labels after BN recalibration "
        "(`SupernetModule.evaluate_arch` on EvolutionSearch's fixed seeded batches: 5 calibration batches of 64, "
        "all 359 validation images) -- **on the 200-cell sample only** (about 0.25 s a cell here: all 15,625 would "
        "take about an hour per seed).", "",
        "## All 15,625 cells", "",
        "Mean +- std over the seeds. `within equal params`: Kendall tau inside groups of equal parameter count, "
        "weighted by group size (what a score knows beyond size; the parameter count itself is constant there).", "",
        "| score | Kendall tau | top-1,000 mean acc. % | tau within equal params |", "|---|---|---|---|"]
    for name in names:
        rows = [r["all_cells"][name] for r in records]
        lines.append(f"| {name} | {fmt([x['tau'] for x in rows])} | {fmt([x['top_k'] for x in rows], 2)} | "
                     f"{fmt([x['within_tau'] for x in rows])} |")
    lines += ["", "| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in records:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['all_cells'][n]['tau']:.3f} / {r['all_cells'][n]['top_k']:.2f}"
                                                      for n in names) + " |")
    lines += ["", "(per seed: Kendall tau / top-1,000 mean accuracy %)"]
    sample_names = list(records[0]["sample"])
    lines += ["", f"## {SAMPLE} cells (`NB201.sample({SAMPLE}, seed=0)`), every score including supernet accuracy", "",
              "| score | Kendall tau | Spearman rho | tau within equal params | CIFAR-10 % of its best-scored cell |",
              "|---|---|---|---|---|"]
    for name in sample_names:
        rows = [r["sample"][name] for r in records]
        lines.append(f"| {name} | {fmt([x['tau'] for x in rows])} | {fmt([x['rho'] for x in rows])} | "
                     f"{fmt([x['within_tau'] for x in rows])} | {fmt([x['pick'] for x in rows], 2)} |")
    paired = (paired_rows(records, "all_cells", [(n, PARAMS) for n in [*angle_names, COMBINED]])
              + paired_rows(records, "sample", [(n, PARAMS) for n in [*angle_names, ACCURACY]])
              + paired_rows(records, "sample", [(n, ACCURACY) for n in angle_names]))
    lines += ["", "## Paired per-seed differences of Kendall tau", "",
              "Same seed = the same supernet initialisation, path sequence and data order (and, for random labels, "
              "the same labels). Interval: two-sided 95 % Student t over the seeds.", "",
              "| cells | a - b | per-seed differences | mean | 95 % interval | a higher in |", "|---|---|---|---|---|---|"]
    for p in paired:
        where = "all 15,625" if p["table"] == "all_cells" else str(SAMPLE)
        lines.append(f"| {where} | {p['a']} - {p['b']} | {', '.join(f'{d:+.3f}' for d in p['diffs'])} | "
                     f"{p['mean']:+.3f} | [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] | {p['wins']} / {len(seeds)} |")
    seconds = {k: fmt([r["seconds"][k] for r in records], 0) for k in records[0]["seconds"]}
    lines += ["", "Wall seconds per seed (mean +- std; loaded machine): "
              + "; ".join(f"{k} {v}" for k, v in seconds.items()) + "."]
    glance = []
    for p in paired:
        if (p["a"], p["b"], p["table"]) == (QUICKSTART_ANGLE, PARAMS, "all_cells"):
            glance.append({"family": "NAS", "what": "all-cell Kendall tau, quickstart angle (cells-only, random "
                                                    "labels, no shrinking) minus parameter count (paired per seed)",
                           "value": f"{p['mean']:+.3f}", "spread": f"95 % CI [{p['ci95'][0]:+.3f}, "
                                                                    f"{p['ci95'][1]:+.3f}], seeds "
                                                                    f"{','.join(map(str, seeds))}",
                           "target": "CI above 0 (the angle ranks better than size)"})
        if (p["a"], p["b"], p["table"]) == (QUICKSTART_ANGLE, ACCURACY, "sample"):
            glance.append({"family": "NAS", "what": f"{SAMPLE}-cell Kendall tau, quickstart angle minus supernet "
                                                    "accuracy (true labels, BN recal.; the seed's claim)",
                           "value": f"{p['mean']:+.3f}", "spread": f"95 % CI [{p['ci95'][0]:+.3f}, "
                                                                    f"{p['ci95'][1]:+.3f}], seeds "
                                                                    f"{','.join(map(str, seeds))}",
                           "target": "CI above 0 (the seed: angle beats supernet accuracy)"})
    record = {"seeds": seeds, "paired": paired,
              "per_seed": [{k: v for k, v in r.items() if k != "sample_scores"} for r in records]}
    return "\n".join(lines) + "\n", glance, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--out", type=Path, default=Path("runs/search_quality_ranks"))
    parser.add_argument("--name", default="search_quality_ranks")
    parser.add_argument("--reuse", action="store_true", help="tabulate only the seeds already cached in --out")
    parser.add_argument("--no-write", action="store_true", help="compute and cache the seeds, write no results")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the machine line of the results says so; the supernet fits pin it themselves
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:
        if args.reuse and not (args.out / f"ranks_s{seed}.json").is_file():
            continue
        records.append(seed_record(seed, args.out))
        print(json.dumps({"seed": seed, "seconds": records[-1]["seconds"]}), flush=True)
    if args.no_write or not records:
        return
    command = "python benchmarks/search_quality_ranks.py " + " ".join(sys.argv[1:])
    markdown, glance, record = report(records, command.strip())
    write_results(args.name, markdown, command=command.strip(), glance=glance)
    target = Path(__file__).resolve().parent / "results" / f"{args.name}_tables.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"name": f"{args.name}_tables", "command": command.strip(), "machine": machine(), "glance": [],
                               **record}, indent=1) + "\n")
    tmp.replace(target)
    print(markdown)


if __name__ == "__main__":
    main()
