"""How good is the architecture a search picks? Recipes x seeds on NAS-Bench-201, the angle presets' rank correlation,
and NASWOT under the paper's protocol.

Three parts, all scored against the shipped NAS-Bench-201 CIFAR-10 table (15,625 cells, `lightning_nd.nas.bench`):

1. **Recipes x seeds** (`--recipes`, `--seeds`, `--threads`): each recipe is the quickstart's `lnd fit` (embedded
   digits, random labels, C=8 N=1 supernet, 8 epochs) with one change, run as a subprocess with
   `--seed_everything S` under `OMP_NUM_THREADS=T`; the table gives the pick, its accuracy, its percentile among
   the 15,625 cells and the wall time.
   * `quickstart`: `configs/quickstart.yaml` (ABS shrinking by the cells-only RLNAS angle, NASWOT search);
   * `rlnas`: `configs/nas/rlnas_quickstart.yaml` (shrinking and search by the official RLNAS-NB201 angle; ABS-NB201
     uses the identical vector, so this row is also the ABS angle);
   * `cells_angle`: the quickstart with the search by the cells-only angle;
   * `rlnas_naswot`: shrinking by the official RLNAS angle, NASWOT search;
   * `naswot`: no training, no shrinking: the NASWOT search over the whole space (`max_epochs 0`).
2. **Rank correlation** (`--corr-seeds`): a supernet trained as in the quickstart without shrinking; Kendall tau and
   Spearman rho of each angle vector (and NASWOT at initialisation) with CIFAR-10 accuracy over 200 cells drawn from
   the table (seed 0), mean +- std over the seeds.
3. **NASWOT, paper protocol**: mean +- std of the accuracy of the best-scored of N cells drawn uniformly with
   replacement from all 15,625 (`nanargmax`), over `--draws` draws, with the NASWOT v1 scores published with the
   paper (shipped in `benchmarks/data`); the paper's own table reports N=10 and N=100.

Usage::

    python benchmarks/search_quality.py                                # everything (about 1 h on an idle 2-core CPU)
    python benchmarks/search_quality.py --quick                        # quickstart + rlnas, seeds 0-1, 1 thread
    python benchmarks/search_quality.py --reuse /tmp/runs ...          # tabulate runs already made (same layout)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402

NASWOT_V1 = ROOT / "benchmarks" / "data" / "naswot_v1_nb201_cifar10_scores.csv.gz"
RECIPES = ("quickstart", "rlnas", "cells_angle", "rlnas_naswot", "naswot")


def recipe_config(recipe: str) -> dict:
    """The YAML of a recipe: the quickstart (or the RLNAS quickstart) with its one change."""
    base = "configs/nas/rlnas_quickstart.yaml" if recipe in ("rlnas", "rlnas_naswot") else "configs/quickstart.yaml"
    config = yaml.safe_load((ROOT / base).read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("EvolutionSearch"):
            if recipe == "cells_angle":
                callback["init_args"]["metric"] = "angle"
            if recipe == "rlnas_naswot":
                callback["init_args"]["metric"] = "naswot"
    if recipe == "naswot":
        config["trainer"]["max_epochs"] = 0
    return config


def run_recipe(recipe: str, seed: int, threads: int, out: Path) -> dict:
    """One `lnd fit` of a recipe in a subprocess; returns the row (pick, accuracy, percentile, wall seconds)."""
    folder = out / recipe / f"s{seed}_t{threads}"
    folder.mkdir(parents=True, exist_ok=True)
    config = recipe_config(recipe)
    config["trainer"].update(default_root_dir=str(folder), enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lightning_nd", "fit", "-c", str(folder / "config.yaml"), "--seed_everything", str(seed)],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{recipe} seed {seed} failed:\n{done.stderr[-3000:]}")
    (folder / "wall.json").write_text(json.dumps({"wall_s": wall}))
    return read_run(recipe, seed, threads, folder)


def read_run(recipe: str, seed: int, threads: int, folder: Path) -> dict:
    """The row of a finished run folder (its arch.json and wall.json)."""
    arch = json.loads(next(folder.rglob("arch.json")).read_text())["best"]
    spaces = list(folder.rglob("shrunk_space.json"))
    wall = json.loads((folder / "wall.json").read_text())["wall_s"] if (folder / "wall.json").is_file() else float("nan")
    return {
        "recipe": recipe, "seed": seed, "threads": threads, "arch": arch["nb201"]["arch_str"],
        "acc": arch["nb201"]["cifar10"], "pct": arch["nb201"]["percentile"]["cifar10"],
        "space": json.loads(spaces[0].read_text())["space_size"] if spaces else 15625, "wall_s": wall,
    }


def naswot_protocol(n: int, draws: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean, std and minimum accuracy of the best-of-``n`` NASWOT v1 pick over ``draws`` uniform draws."""
    from lightning_nd.nas.bench import NB201

    with gzip.open(NASWOT_V1, "rt") as f:
        rows = list(csv.DictReader(f))
    scores = np.array([float(r["naswot_v1_score"]) if r["naswot_v1_score"] not in ("", "nan") else np.nan for r in rows])
    acc = NB201().accuracies("cifar10")
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(draws):
        idx = rng.integers(0, len(scores), size=n)  # with replacement, as the paper's search.py
        s = scores[idx]
        picks.append(acc[idx[int(np.nanargmax(s))]] if np.isfinite(s).any() else np.nan)
    picks = np.array(picks)
    return float(np.nanmean(picks)), float(np.nanstd(picks)), float(np.nanmin(picks))


def correlations(seeds: list[int], n_cells: int = 200) -> list[dict]:
    """Kendall / Spearman of each angle vector and of NASWOT (at init) over ``n_cells`` table cells, per seed."""
    import lightning.pytorch as pl
    import torch

    from lightning_nd.callbacks import AngleTracker
    from lightning_nd.datamodules import DigitsDataModule, RandomLabels
    from lightning_nd.modules import SupernetModule
    from lightning_nd.nas import naswot_score
    from lightning_nd.nas.bench import NB201, rank_correlation
    from lightning_nd.nas.spaces.nb201 import str_to_arch

    bench = NB201()
    cells = bench.sample(n_cells, seed=0)
    archs = np.array([str_to_arch(c) for c in cells])
    acc = [bench.accuracy(c) for c in cells]
    vectors = {
        "RLNAS/ABS-NB201 angle (preset)": {"preset": "rlnas_nb201"},
        "cells-only angle (preset, cells_only)": {"preset": "rlnas_nb201", "cells_only": True},
        "old quickstart flags (all BN affine, biases, eye)": {"include_bn_affine": True, "include_bias": True,
                                                              "identity": "eye"},
    }
    rows = []
    for seed in seeds:
        pl.seed_everything(seed)
        model = SupernetModule("nb201", num_classes=10, space_kwargs={"C": 8, "N": 1}, calib_batches=0,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                                                   weight_decay=5e-4))
        dm = RandomLabels(DigitsDataModule(image_size=16, channels=3, batch_size=64))
        init = {k: v.clone() for k, v in model.net.state_dict().items()}
        dm.setup("fit")
        x = dm.datamodule.sample_batch(128, split="train")[0]
        nw = [naswot_score(model.net, x, arch=a) for a in archs.tolist()]
        pl.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0).fit(model, datamodule=dm)
        for name, kwargs in vectors.items():
            tracker = AngleTracker.from_reference(model.net, init, **kwargs)
            tracker.compute_statistics(model.net)
            tau, rho = rank_correlation(tracker.path_angles(archs), acc)
            rows.append({"score": name, "seed": seed, "tau": tau, "rho": rho})
        ok = [i for i, v in enumerate(nw) if np.isfinite(v)]
        tau, rho = rank_correlation([nw[i] for i in ok], [acc[i] for i in ok])
        rows.append({"score": "NASWOT v2 at init (same supernet, digits batch 128)", "seed": seed, "tau": tau, "rho": rho})
    return rows


def stats(values: list[float]) -> str:
    v = np.array(values, dtype=float)
    return f"{v.mean():.2f} +- {v.std():.2f} (min {v.min():.2f})" if len(v) else "-"


def report(runs: list[dict], corr: list[dict], protocol: dict, command: str) -> tuple[str, list[dict]]:
    lines = ["# Search quality on NAS-Bench-201 (CIFAR-10 test accuracy of the pick)", "",
             f"Command: `{command}`. Machine: a 2-core CPU shared with other jobs (wall times are noisy, load ~10).", ""]
    glance = []
    if runs:
        lines += ["## Recipes x seeds", "", "| recipe | seed | torch threads | pick | CIFAR-10 % | percentile | "
                  "space searched | wall s |", "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['recipe']} | {r['seed']} | {r['threads']} | `{r['arch']}` | {r['acc']:.2f} | "
                         f"{r['pct']:.1f} | {r['space']} | {r['wall_s']:.0f} |")
        lines += ["", "| recipe | threads | seeds | accuracy mean +- std (min) | percentile mean |", "|---|---|---|---|---|"]
        for (recipe, threads), group in itertools.groupby(sorted(runs, key=lambda r: (r["recipe"], r["threads"])),
                                                          key=lambda r: (r["recipe"], r["threads"])):
            group = list(group)
            lines.append(f"| {recipe} | {threads} | {', '.join(str(r['seed']) for r in group)} | "
                         f"{stats([r['acc'] for r in group])} | {np.mean([r['pct'] for r in group]):.1f} |")
            if recipe == "quickstart":
                glance.append({"family": "NAS", "what": f"quickstart pick, NB201 CIFAR-10 acc ({threads} thread(s))",
                               "value": f"{np.mean([r['acc'] for r in group]):.2f} %",
                               "spread": f"min {min(r['acc'] for r in group):.2f} %, seeds "
                                         f"{','.join(str(r['seed']) for r in group)}",
                               "target": "mean >= 92.5 %, none < 91.0 %"})
        lines += ["", "Reference points (NB201 table): random cell mean 87.06 %, median 90.75 %, top 10 % >= 92.93 %, "
                  "RLNAS's published pick 93.45 %, optimum 94.37 %."]
    if corr:
        lines += ["", "## Rank correlation with CIFAR-10 accuracy (200 cells, seed-0 sample of the table)", "",
                  "| score | Kendall tau | Spearman rho | seeds |", "|---|---|---|---|"]
        names = list(dict.fromkeys(r["score"] for r in corr))
        for name in names:
            group = [r for r in corr if r["score"] == name]
            tau, rho = np.array([r["tau"] for r in group]), np.array([r["rho"] for r in group])
            lines.append(f"| {name} | {tau.mean():.3f} +- {tau.std():.3f} | {rho.mean():.3f} +- {rho.std():.3f} | "
                         f"{','.join(str(r['seed']) for r in group)} |")
    if protocol:
        lines += ["", "## NASWOT, the paper's protocol (published v1 scores, best of N uniform draws)", "",
                  "| N | draws | CIFAR-10 % mean +- std | worst draw | paper (v1 README) |", "|---|---|---|---|---|"]
        paper = {10: "91.58 +- 1.70", 100: "91.24 +- 1.70"}
        for n, (mean, std, low, draws) in protocol.items():
            lines.append(f"| {n} | {draws} | {mean:.2f} +- {std:.2f} | {low:.2f} | {paper.get(n, '-')} |")
            if n == 100:
                glance.append({"family": "NAS", "what": "NASWOT v1 best-of-100 (paper protocol), NB201 CIFAR-10",
                               "value": f"{mean:.2f} %", "spread": f"+- {std:.2f} over {draws} draws",
                               "target": "paper 91.24 +- 1.70 (v1 README, N=100)"})
    return "\n".join(lines) + "\n", glance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES, help="none: no runs")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--corr-seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=500, help="draws of the NASWOT protocol (paper: 500)")
    parser.add_argument("--out", type=Path, default=Path("runs/search_quality"))
    parser.add_argument("--reuse", action="store_true", help="tabulate finished runs found under --out")
    parser.add_argument("--quick", action="store_true", help="quickstart + rlnas, seeds 0-1, 1 thread, 1 corr seed")
    parser.add_argument("--corr-cache", type=Path, default=None,
                        help="JSON file of the correlation rows: read when it exists, else computed and written")
    parser.add_argument("--note", type=Path, default=None, help="a markdown file appended to the report")
    parser.add_argument("--name", default="search_quality")
    args = parser.parse_args()
    if args.quick:
        args.recipes, args.seeds, args.threads, args.corr_seeds = ["quickstart", "rlnas"], [0, 1], [1], [0]
    runs = []
    for recipe, threads, seed in itertools.product(args.recipes, args.threads, args.seeds):
        folder = args.out / recipe / f"s{seed}_t{threads}"
        if args.reuse:
            if any(folder.rglob("arch.json")):
                runs.append(read_run(recipe, seed, threads, folder))
            continue
        runs.append(run_recipe(recipe, seed, threads, args.out))
        print(json.dumps(runs[-1]), flush=True)
    if args.corr_cache is not None and args.corr_cache.is_file():
        corr = json.loads(args.corr_cache.read_text())
    else:
        corr = correlations(args.corr_seeds) if args.corr_seeds else []
        if args.corr_cache is not None:
            args.corr_cache.write_text(json.dumps(corr))
    protocol = {n: (*naswot_protocol(n, args.draws), args.draws) for n in (10, 100)}
    command = "python benchmarks/search_quality.py " + " ".join(sys.argv[1:])
    markdown, glance = report(runs, corr, protocol, command.strip())
    if args.note is not None:
        markdown += "\n" + args.note.read_text()
    write_results(args.name, markdown, command=command.strip(), glance=glance)
    print(markdown)


if __name__ == "__main__":
    main()
