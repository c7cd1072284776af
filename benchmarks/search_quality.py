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
   * `naswot`: no training, no shrinking: the NASWOT search over the whole space (`max_epochs 0`);
   * `params_shrink_naswot` (training-free control): the quickstart's ABS drop rule and schedule (ops dropped per
     step, space threshold, number of shrink steps its 8 epochs allow) with each op scored by the mean parameter
     count of the cells containing it instead of the angle, then the same NASWOT search (`ControlShrink`);
   * `random_shrink_naswot` (training-free control): the same rule with uniform random op scores.
   Paired differences per seed (same seed: same labels, sampler, data order, NASWOT batch and initialisation) with
   a two-sided 95 % t-interval; `<name>_recipes.json` lists every recipe by name with its runs and the paired tests.
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
    python benchmarks/search_quality.py --recipes quickstart params_shrink_naswot random_shrink_naswot naswot
        --seeds ... --threads 1 --corr-seeds --name search_quality_controls   # the controls (one command line)

The rank tables on supernets trained without shrinking, on random and on true labels, with the supernet's own
accuracy as a score: ``benchmarks/search_quality_ranks.py`` (shares ``fit_config`` and ``rank_stats``).
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
from typing import Any

import numpy as np
import yaml
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_stats import t_interval, top_k_mean, unit_ranks, within_group_tau  # noqa: E402
from results_io import machine, write_results  # noqa: E402

from lightning_nd.callbacks import ProgressivePruner  # noqa: E402
from lightning_nd.nas.arch import alive_options  # noqa: E402
from lightning_nd.nas.flops import ArchCost  # noqa: E402

NASWOT_V1 = ROOT / "benchmarks" / "data" / "naswot_v1_nb201_cifar10_scores.csv.gz"
RECIPES = ("quickstart", "rlnas", "cells_angle", "rlnas_naswot", "naswot", "params_shrink_naswot",
           "random_shrink_naswot", "angle_size_shrink_naswot")
# Training-free controls of the quickstart: the same NASWOT search over the whole space or over a space shrunk by
# the same ABS drop rule with another score (no supernet training at all).
CONTROL_SCORES = {"params_shrink_naswot": "params", "random_shrink_naswot": "random"}
TRAINING_FREE = ("naswot", *CONTROL_SCORES)
PAIRED = [("quickstart", "params_shrink_naswot"), ("quickstart", "naswot"), ("quickstart", "random_shrink_naswot"),
          ("params_shrink_naswot", "naswot"), ("quickstart", "rlnas"),
          ("angle_size_shrink_naswot", "params_shrink_naswot"), ("angle_size_shrink_naswot", "quickstart")]


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
    if recipe == "angle_size_shrink_naswot":
        pruner = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ProgressivePruner"))
        pruner["class_path"] = "search_quality.AngleSizePruner"
    if recipe in TRAINING_FREE:
        config["trainer"]["max_epochs"] = 0
        callbacks = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EvolutionSearch")]
        if recipe in CONTROL_SCORES:
            pruner = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ProgressivePruner"))
            args = pruner["init_args"]
            steps = len([e for e in range(yaml.safe_load((ROOT / base).read_text())["trainer"]["max_epochs"])
                         if e + 1 >= args["warmup_epochs"] and (e + 1 - args["warmup_epochs"]) % args["interval"] == 0])
            callbacks.insert(0, {"class_path": "search_quality.ControlShrink", "init_args": {
                "score": CONTROL_SCORES[recipe], "drop_per_step": args["drop_per_step"],
                "space_threshold": args["space_threshold"], "max_steps": steps}})
        config["trainer"]["callbacks"] = callbacks
    return config


class ControlShrink(Callback):
    """ABS's drop rule (``ProgressivePruner.select_ops_to_drop``) with the angle replaced by a training-free score.

    At fit start, up to ``max_steps`` times while the space holds more than ``space_threshold`` cells: every open op
    is scored by the mean ``score`` over all alive cells containing it (as the pruner does exhaustively with the
    angle), and the ``drop_per_step`` lowest ops are masked with the pruner's own rule and tie order. ``"params"``
    scores a cell by its parameter count (``ArchCost``, no data, no training); ``"random"`` draws one uniform score
    per op and step from a generator seeded by ``seed_everything``'s seed (a random shrink of the same schedule).
    Writes ``shrunk_space.json`` like the pruner.
    """

    def __init__(self, score: str = "params", drop_per_step: int = 4, space_threshold: float = 2000,
                 max_steps: int = 3) -> None:
        if score not in ("params", "random"):
            raise ValueError(f"score={score!r} is not supported; allowed: 'params', 'random'")
        self.score, self.drop_per_step, self.space_threshold, self.max_steps = score, drop_per_step, space_threshold, max_steps

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        import torch

        from lightning_nd.callbacks import ProgressivePruner
        from lightning_nd.callbacks.angle_tracker import supernet_of
        from lightning_nd.nas.arch import alive_options, set_alive, space_size
        from lightning_nd.nas.flops import ArchCost
        from lightning_nd.utils import atomic_write_text, run_dir

        net = supernet_of(pl_module)
        rule = ProgressivePruner(drop_per_step=self.drop_per_step)
        cost = ArchCost(net, trainer.datamodule.input_shape)
        seed = int(torch.initial_seed())
        dropped = []
        for step in range(self.max_steps):
            if space_size(net) <= self.space_threshold:
                break
            options = alive_options(net)
            archs = np.array(list(itertools.product(*options)), dtype=np.int64)
            rng = np.random.default_rng([seed, step])
            value = cost.params_many(archs).astype(float) if self.score == "params" else None
            scores = {(d, o): float(value[archs[:, d] == o].mean()) if value is not None else float(rng.random())
                      for d, opts in enumerate(options) if len(opts) > 1 for o in opts}
            drops = rule.select_ops_to_drop(scores, options)
            for d, o in drops:
                set_alive(net, d, o, False)
            dropped.append([list(map(int, x)) for x in drops])
        folder = run_dir(trainer)
        if trainer.is_global_zero:
            atomic_write_text(json.dumps({"space_size": space_size(net), "score": self.score, "dropped": dropped,
                                          "alive": alive_options(net)}, indent=2), folder / "shrunk_space.json")


class AngleSizePruner(ProgressivePruner):
    """The quickstart's pruner with each cell scored by the rank sum of its angle and its parameter count.

    The one combination that ranks all 15,625 cells better than size alone (``--all-cells``: Kendall tau +0.017 over
    the parameter count on every seed), tried as the shrink rule: per shrink step every alive cell gets ``(rank of
    its angle + rank of its parameter count) / (2 * cells)`` (average ranks for ties), and an op scores the mean over
    the cells containing it (the pruner's exhaustive rule; NB201's shrunk spaces are always enumerated).
    """

    @override
    def score_ops(self, stats: Any, net: Any, rng: Any, trainer: Any = None) -> dict[tuple[int, int], float]:
        from scipy.stats import rankdata

        options = alive_options(net)
        archs = np.array(list(itertools.product(*options)), dtype=np.int64)
        angle = rankdata(stats.path_angles(archs, self._weight_free()))
        size = rankdata(ArchCost(net, trainer.datamodule.input_shape).params_many(archs))
        combined = (angle + size) / (2 * len(archs))
        return {(d, o): float(combined[archs[:, d] == o].mean())
                for d, opts in enumerate(options) if len(opts) > 1 for o in opts}


def run_recipe(recipe: str, seed: int, threads: int, out: Path) -> dict:
    """One `lnd fit` of a recipe in a subprocess; returns the row (pick, accuracy, percentile, wall seconds)."""
    folder = out / recipe / f"s{seed}_t{threads}"
    fit_config(recipe_config(recipe), folder, seed, threads, what=recipe)
    return read_run(recipe, seed, threads, folder)


def fit_config(config: dict, folder: Path, seed: int, threads: int, what: str = "run") -> float:
    """`lnd fit` of ``config`` in a subprocess writing into ``folder`` (``wall.json``: its wall seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    config["trainer"].update(default_root_dir=str(folder), enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lightning_nd", "fit", "-c", str(folder / "config.yaml"), "--seed_everything", str(seed)],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{what} seed {seed} failed:\n{done.stderr[-3000:]}")
    (folder / "wall.json").write_text(json.dumps({"wall_s": wall}))
    return wall


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


DESCRIPTIONS = {
    "quickstart": "angle shrink + NASWOT: the quickstart (8 epochs on random labels, ABS drop rule scored by the "
                  "cells-only RLNAS angle, NASWOT search of what is left)",
    "params_shrink_naswot": "params shrink + NASWOT: the same ABS drop rule scored by the mean parameter count of "
                            "the cells containing the op; no training, no data (training-free control)",
    "random_shrink_naswot": "random shrink + NASWOT: the same drop rule and schedule with uniform random op scores "
                            "(training-free control)",
    "naswot": "NASWOT alone: the same NASWOT search over all 15,625 cells (training-free control)",
    "rlnas": "RLNAS angle: shrink and search by the official RLNAS-NB201 angle",
    "cells_angle": "angle shrink + cells-only angle search",
    "rlnas_naswot": "official-angle shrink + NASWOT search",
    "angle_size_shrink_naswot": "angle+size shrink + NASWOT: the quickstart with each op scored by the mean over its "
                                "cells of the rank sum of angle and parameter count (trained; not a control)",
}


def paired(runs: list[dict], a: str, b: str, threads: int = 1) -> dict | None:
    """Per-seed differences ``acc(a) - acc(b)`` over the seeds both recipes ran, with a two-sided 95 % t-interval."""
    acc = {(r["recipe"], r["seed"]): r["acc"] for r in runs if r["threads"] == threads}
    seeds = sorted(seed for (recipe, seed) in acc if recipe == a and (b, seed) in acc)
    if len(seeds) < 2:
        return None
    diff = np.array([acc[(a, s)] - acc[(b, s)] for s in seeds])
    return {"a": a, "b": b, "seeds": seeds, "diffs": diff.round(4).tolist(), "mean": float(diff.mean()),
            "ci95": t_interval(diff), "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
            "losses": int((diff < 0).sum())}


def recipes_record(runs: list[dict]) -> dict:
    """The JSON record of the runs: every recipe by name (training-free controls say so) and the paired tests."""
    record: dict[str, Any] = {"recipes": {}, "paired": []}
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        rows = [r for r in runs if r["recipe"] == recipe]
        acc = np.array([r["acc"] for r in rows])
        record["recipes"][recipe] = {
            "description": DESCRIPTIONS.get(recipe, ""), "training_free": recipe in TRAINING_FREE,
            "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "min": float(acc.min()), "runs": rows,
        }
    record["paired"] = [p for a, b in PAIRED if (p := paired(runs, a, b)) is not None]
    return record


def nb201_cells() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 15,625 NB201 cells in the table's order: CIFAR-10 test accuracy, architectures, parameter counts."""
    from lightning_nd.nas.bench import NB201
    from lightning_nd.nas.spaces.nb201 import str_to_arch

    bench = NB201()
    acc = bench.accuracies("cifar10")
    archs = np.array([str_to_arch(bench.arch_str(i)) for i in range(len(acc))])
    return acc, archs, np.array([NB201.params(a.tolist()) for a in archs])


def load_supernet(ckpt: Path) -> tuple[Any, dict]:
    """The quickstart's SupernetModule from a checkpoint (eval mode) and its AngleTracker state."""
    import torch

    from lightning_nd.modules import SupernetModule

    args = recipe_config("quickstart")["model"]["init_args"]
    data = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = SupernetModule(args["supernet"], num_classes=args["num_classes"], in_chans=args["in_chans"],
                           space_kwargs=args["space_kwargs"], calib_batches=args["calib_batches"])
    model.load_state_dict(data["state_dict"])
    model.eval()
    return model, next(v for k, v in data["callbacks"].items() if "AngleTracker" in k)


def all_cell_rows(out: Path, seeds: list[int], threads: int = 1) -> list[dict]:
    """Rank table over all 15,625 cells on the final checkpoint of every quickstart run found under ``out``.

    Per seed: Kendall tau with CIFAR-10 accuracy and the mean accuracy of the top 1,000 cells for the quickstart's
    angle (cells-only RLNAS-NB201, against the run's saved reference), the parameter count (no training), and their
    rank sum (each normalised to [0, 1]); and the angle's tau inside groups of equal parameter count (weighted by
    group size: what the angle knows beyond size; the parameter count scores 0 there).
    """
    from scipy.stats import kendalltau

    from lightning_nd.callbacks import AngleTracker

    acc, archs, params = nb201_cells()
    tracker_args = next(c["init_args"] for c in recipe_config("quickstart")["trainer"]["callbacks"]
                        if c["class_path"].endswith("AngleTracker"))

    rows = []
    for folder in sorted((out / "quickstart").glob(f"s*_t{threads}")):
        ckpts = sorted(folder.rglob("*.ckpt"))
        if not ckpts or not any(folder.rglob("arch.json")):  # a finished run only (its checkpoint is the last one)
            continue
        if int(folder.name[1:].split("_")[0]) not in seeds:
            continue
        model, state = load_supernet(ckpts[-1])
        tracker = AngleTracker(**tracker_args)
        tracker.load_state_dict(state)
        tracker.compute_statistics(model)
        angle = tracker.path_angles(archs)
        row = {"seed": int(folder.name[1:].split("_")[0])}
        for name, score in (("angle", angle), ("params", params),
                            ("angle+params", unit_ranks(angle) + unit_ranks(params))):
            row[name] = {"tau": float(kendalltau(score, acc)[0]), "top1000": top_k_mean(score, acc, 1000)}
        row["angle_within_params_tau"] = float(within_group_tau(angle, acc, np.round(params, 6)))
        rows.append(row)
    return rows


def stats(values: list[float]) -> str:
    v = np.array(values, dtype=float)
    return f"{v.mean():.2f} +- {v.std():.2f} (min {v.min():.2f})" if len(v) else "-"


def report(runs: list[dict], corr: list[dict], protocol: dict, command: str,
           cells: list[dict] | None = None) -> tuple[str, list[dict]]:
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
            if recipe == "quickstart" and not any(r["recipe"] in CONTROL_SCORES for r in runs):  # else: paired row
                glance.append({"family": "NAS", "what": f"quickstart pick, NB201 CIFAR-10 acc ({threads} thread(s))",
                               "value": f"{np.mean([r['acc'] for r in group]):.2f} %",
                               "spread": f"min {min(r['acc'] for r in group):.2f} %, seeds "
                                         f"{','.join(str(r['seed']) for r in group)}",
                               "target": "mean >= 92.5 %, none < 91.0 %"})
        lines += ["", "Reference points (NB201 table): random cell mean 87.06 %, median 90.75 %, top 10 % >= 92.93 %, "
                  "RLNAS's published pick 93.45 %, optimum 94.37 %."]
        record = recipes_record(runs)
        if record["paired"]:
            lines += ["", "## Paired differences per seed (CIFAR-10 points, 1 thread)", "",
                      "Same seed = same random labels, sampler, data order and NASWOT batch and initialisation. "
                      "Interval: two-sided 95 % Student t over the seeds both recipes ran.", "",
                      "| a - b | seeds | per-seed differences | mean | 95 % interval | a better / tie / worse |",
                      "|---|---|---|---|---|---|"]
            for p in record["paired"]:
                lines.append(f"| {p['a']} - {p['b']} | {','.join(map(str, p['seeds']))} | "
                             f"{', '.join(f'{d:+.2f}' for d in p['diffs'])} | {p['mean']:+.3f} | "
                             f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] | {p['wins']} / {p['ties']} / {p['losses']} |")
            lines += ["", "Recipes:", ""] + [f"- `{name}`: {r['description']}" for name, r in record["recipes"].items()]
            for p in record["paired"]:
                if (p["a"], p["b"]) == ("quickstart", "params_shrink_naswot"):
                    glance.append({
                        "family": "NAS", "what": "quickstart pick (mean "
                                                 f"{record['recipes']['quickstart']['mean']:.2f} %) minus the "
                                                 "parameter-count shrink + NASWOT control (paired per seed, NB201 "
                                                 "CIFAR-10 points)",
                        "value": f"{p['mean']:+.2f}",
                        "spread": f"95 % CI [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}], seeds "
                                  f"{','.join(map(str, p['seeds']))}",
                        "target": "CI above 0 (the angle earns its place)"})
    if cells:
        lines += ["", "## All 15,625 cells, on each quickstart run's final checkpoint", "",
                  "Kendall tau with CIFAR-10 accuracy / mean accuracy of the top 1,000 cells. `angle`: the quickstart's "
                  "cells-only RLNAS angle; `params`: parameter count (no training); `angle+params`: the sum of both "
                  "ranks (each scaled to [0, 1]); last column: the angle's tau inside groups of equal parameter count "
                  "(weighted by group size).", "",
                  "| seed | angle | params | angle+params | angle within equal params |", "|---|---|---|---|---|"]
        for r in cells:
            lines.append(f"| {r['seed']} | " + " | ".join(f"{r[k]['tau']:.3f} / {r[k]['top1000']:.2f}"
                                                         for k in ("angle", "params", "angle+params"))
                         + f" | {r['angle_within_params_tau']:.3f} |")
        diff = np.array([r["angle+params"]["tau"] - r["params"]["tau"] for r in cells])
        lines += ["", f"angle+params minus params, all-cell tau per seed: {', '.join(f'{d:+.3f}' for d in diff)} "
                      f"(mean {diff.mean():+.3f}); angle minus params: "
                      f"{np.mean([r['angle']['tau'] - r['params']['tau'] for r in cells]):+.3f} on average."]
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
    parser.add_argument("--draws", type=int, default=500, help="draws of the NASWOT protocol (paper: 500; 0: skip it)")
    parser.add_argument("--out", type=Path, default=Path("runs/search_quality"))
    parser.add_argument("--reuse", action="store_true", help="tabulate finished runs found under --out")
    parser.add_argument("--quick", action="store_true", help="quickstart + rlnas, seeds 0-1, 1 thread, 1 corr seed")
    parser.add_argument("--corr-cache", type=Path, default=None,
                        help="JSON file of the correlation rows: read when it exists, else computed and written")
    parser.add_argument("--note", type=Path, default=None, help="a markdown file appended to the report")
    parser.add_argument("--name", default="search_quality")
    parser.add_argument("--all-cells", action="store_true",
                        help="rank table over all 15,625 cells on the final checkpoint of each quickstart run in --out")
    args = parser.parse_args()
    if args.quick:
        args.recipes, args.seeds, args.threads, args.corr_seeds = ["quickstart", "rlnas"], [0, 1], [1], [0]
    runs = []
    for seed, threads, recipe in itertools.product(args.seeds, args.threads, args.recipes):  # paired rows first
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
    protocol = {n: (*naswot_protocol(n, args.draws), args.draws) for n in (10, 100)} if args.draws > 0 else {}
    command = "python benchmarks/search_quality.py " + " ".join(sys.argv[1:])
    cells = all_cell_rows(args.out, args.seeds) if args.all_cells else []
    markdown, glance = report(runs, corr, protocol, command.strip(), cells)
    if runs or cells:
        target = ROOT / "benchmarks" / "results" / f"{args.name}_recipes.json"
        tmp = target.with_suffix(".json.tmp")
        # the keys results_io writes (glance.py reads every results JSON); the rows are in search_quality's own files
        record = {"name": f"{args.name}_recipes", "command": command.strip(), "machine": machine(), "glance": [],
                  **recipes_record(runs), "all_cells": cells}
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, target)
    if args.note is not None:
        markdown += "\n" + args.note.read_text()
    write_results(args.name, markdown, command=command.strip(), glance=glance)
    print(markdown)


if __name__ == "__main__":
    main()
