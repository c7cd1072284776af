"""Is the RLNAS pick on the DARTS space any good? Retrain picks and controls at one equal small budget.

Per seed ``s`` (``--seeds``), four searches over the same DARTS space (``configs/nas/rlnas_darts.yaml`` shrunk to
a CPU budget: the same supernet width, cells and input size for all four, the same EA settings and seed):

* ``rlnas``: the recipe itself: the supernet trained on random labels, then ``EvolutionSearch(metric="angle")``
  with the ``rlnas_darts`` angle;
* ``params``: the training-free parameter-count control: no training, the same EA maximising the path's parameter
  count (:func:`params_metric`, ``ArchCost``), the cheapest thing that could explain an angle pick (the angle grows
  with the weights a path carries);
* ``naswot``: no training, the same EA maximising NASWOT (v2, re-initialised supernet, the paper's protocol);
* ``min_params``: no training, the same EA minimising the parameter count (:func:`min_params_metric`): the control
  for an angle pick made of parameter-free ops, which is what the RLNAS search picks at this budget.

Then every genotype is retrained from scratch with ``configs/nas/retrain_darts.yaml`` (``DartsNetwork`` through
``ImageClassifier``: SGD 0.025 / momentum 0.9 / wd 3e-4, cosine, drop-path ramp 0.1, crop+flip) at one budget
(same width, cells, images, epochs) and scored by top-1 on ``val_size`` Fashion-MNIST training images held out of
both search and retrain (split seed 0): the pick of seed ``s`` with seed ``s``; ``darts_v2`` and ``--randoms``
random genotypes with every seed. The random genotypes are drawn uniformly over valid DARTS paths (``PathSampler``,
seed ``RANDOM_SEED``) and kept only if the retrain network's parameter count lies within ``--band`` (relative) of
the mean of the RLNAS picks' counts: uniform over the cells of that size.

Target (issue 25): the RLNAS picks' mean above the random genotypes' mean by more than their spread (std of the
random genotypes' seed means). Also the paired differences per seed, RLNAS - each control and - darts_v2.

Every search and retrain writes a JSON under ``--workdir``; a rerun skips what is there (resume after a crash, or
add seeds), so the tabulation is a function of those files.

Usage::

    nice -n 10 python benchmarks/darts_quality.py --quick          # smoke (about a minute): tiny net, one seed
    nice -n 10 python benchmarks/darts_quality.py --seeds 0 1 2    # the reported run (1 torch thread)
    # a longer retrain, one process per seed (the searches are reused from the workdir):
    nice -n 10 python benchmarks/darts_quality.py --seeds 0 --size-seeds 0 1 2 --retrain-images 6000  # (and 1, 2)
    nice -n 10 python benchmarks/darts_quality.py --seeds 0 1 2 --retrain-images 6000   # then: tabulate all
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_stats import t_interval  # noqa: E402
from results_io import machine, write_results  # noqa: E402

from lightning_nd.nas import build_space  # noqa: E402
from lightning_nd.nas.sampler import PathSampler  # noqa: E402
from lightning_nd.nas.spaces.darts import GENOTYPES, arch_to_genotype, build_network, genotype_to_dict  # noqa: E402
from lightning_nd.utils import atomic_write_text  # noqa: E402

RANDOM_SEED = 2025
SEARCHES = ("rlnas", "params", "naswot", "min_params")
# budget: supernet width/cells, input side, search images/epochs, EA, retrain images/epochs, held-out images
FULL = {"C": 8, "layers": 5, "image_size": 28, "search_images": 3000, "search_epochs": 3,
        "ea": {"population": 20, "top_k": 10, "mutations": 10, "crossovers": 10, "generations": 8},
        "retrain_images": 1500, "retrain_epochs": 2, "val_size": 2000, "batch_size": 64}
QUICK = {"C": 4, "layers": 3, "image_size": 28, "search_images": 128, "search_epochs": 1,
         "ea": {"population": 6, "top_k": 2, "mutations": 2, "crossovers": 2, "generations": 2},
         "retrain_images": 128, "retrain_epochs": 1, "val_size": 256, "batch_size": 64}
SEARCH_KEYS = ("C", "layers", "image_size", "search_images", "search_epochs", "ea", "val_size", "batch_size")
RETRAIN_KEYS = ("C", "layers", "image_size", "retrain_images", "retrain_epochs", "val_size", "batch_size")
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}

_COSTS: dict[int, Any] = {}


def params_metric(pl_module: Any, arch: list[int]) -> float:
    """Parameter count of ``arch`` in the supernet (``ArchCost`` table, no data): the training-free control."""
    from lightning_nd.nas.flops import ArchCost

    net = pl_module.net
    if id(net) not in _COSTS:  # parameter counts do not depend on the input side; 28 px is the benchmark's
        _COSTS[id(net)] = ArchCost(net, (3, 28, 28))
    return float(_COSTS[id(net)].params(arch))


def min_params_metric(pl_module: Any, arch: list[int]) -> float:
    """Minus the parameter count: the control for a pick made of parameter-free ops (pooling, skip)."""
    return -params_metric(pl_module, arch)


def search_config(method: str, seed: int, budget: dict, out: Path) -> dict:
    """``configs/nas/rlnas_darts.yaml`` shrunk to ``budget``; ``params``/``naswot`` drop the training."""
    config = yaml.safe_load((ROOT / "configs" / "nas" / "rlnas_darts.yaml").read_text())
    config["seed_everything"] = seed
    trainer = config["trainer"]
    trainer.update(QUIET, default_root_dir=str(out), max_epochs=budget["search_epochs"], limit_val_batches=0,
                   num_sanity_val_steps=0)
    model = config["model"]["init_args"]
    model["space_kwargs"].update(C=budget["C"], layers=budget["layers"])
    model["lr_scheduler"]["init_args"]["T_max"] = budget["search_epochs"]
    data = config["data"]["init_args"]["datamodule"]["init_args"]
    data.update(image_size=budget["image_size"], train_subset=budget["search_images"], val_size=budget["val_size"],
                batch_size=budget["batch_size"])
    search = next(c for c in trainer["callbacks"] if c["class_path"].endswith("EvolutionSearch"))
    search["init_args"].update(budget["ea"], dirpath=str(out))
    if method != "rlnas":
        trainer["max_epochs"] = 0
        trainer["callbacks"] = [search]
        search["init_args"]["metric"] = {"naswot": "naswot", "params": "darts_quality.params_metric",
                                         "min_params": "darts_quality.min_params_metric"}[method]
        if method == "naswot":  # the paper's v2 batch is 128; half of it halves the search's cost here
            search["init_args"]["naswot_batch_size"] = budget["batch_size"]
        config["data"] = config["data"]["init_args"]["datamodule"]  # real images; labels unused
    return config


def retrain_config(genotype: dict, seed: int, budget: dict, out: Path) -> dict:
    """``configs/nas/retrain_darts.yaml`` at ``budget`` for ``genotype``, validating once at the end."""
    config = yaml.safe_load((ROOT / "configs" / "nas" / "retrain_darts.yaml").read_text())
    config["seed_everything"] = seed
    trainer = config["trainer"]
    epochs = budget["retrain_epochs"]
    trainer.update(QUIET, default_root_dir=str(out), max_epochs=epochs, check_val_every_n_epoch=epochs,
                   num_sanity_val_steps=0, callbacks=[])  # ReparamFuse's deploy export does not change accuracy
    model = config["model"]["init_args"]
    model["model"]["init_args"].update(genotype=genotype, C=budget["C"], layers=budget["layers"])
    model["lr_scheduler"]["init_args"]["T_max"] = epochs
    config["data"]["init_args"].update(image_size=budget["image_size"], channels=3,
                                       train_subset=budget["retrain_images"], val_size=budget["val_size"],
                                       batch_size=budget["batch_size"])
    return config


def _cached(path: Path, budget: dict, keys: tuple[str, ...]) -> dict | None:
    """The record at ``path`` if it was made with the same ``keys`` of the budget (else it is redone)."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("budget") == {k: budget[k] for k in keys} else None


def _write_json(path: Path, record: dict) -> None:
    atomic_write_text(json.dumps(record, indent=2) + "\n", path)


def run_search(method: str, seed: int, budget: dict, workdir: Path) -> dict:
    """The pick of ``method`` at ``seed`` (cached in ``<workdir>/search/<method>_s<seed>.json``)."""
    from lightning_nd.cli import create_cli

    record_path = workdir / "search" / f"{method}_s{seed}.json"
    if (record := _cached(record_path, budget, SEARCH_KEYS)) is not None:
        return record
    out = workdir / "runs" / f"{method}_s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(search_config(method, seed, budget, out)))
    start = time.perf_counter()
    create_cli(["fit", "-c", str(out / "config.yaml")])
    best = json.loads((out / "arch.json").read_text())["best"]
    record = {"method": method, "seed": seed, "arch": best["arch"], "score": best["score"],
              "genotype": best["genotype"], "wall_s": time.perf_counter() - start,
              "budget": {k: budget[k] for k in SEARCH_KEYS}}
    _write_json(record_path, record)
    return record


def network_params(genotype: Any, budget: dict) -> int:
    net = build_network(genotype, budget["C"], budget["layers"], 10)
    return sum(p.numel() for p in net.parameters())


def random_genotypes(count: int, target: float, band: float, budget: dict, max_draws: int = 20000) -> list[dict]:
    """``count`` uniform random valid genotypes whose retrain network has ``target * (1 +- band)`` parameters.

    Paths are drawn uniformly over the space (``PathSampler``, seed ``RANDOM_SEED``, draw ``i`` = step ``i``) and
    rejected outside the band: uniform over the valid genotypes of that size.
    """
    supernet = build_space("darts", num_classes=10, in_chans=3, C=budget["C"], layers=budget["layers"])
    sampler = PathSampler(supernet, seed=RANDOM_SEED)
    kept, seen = [], set()
    for draw in range(max_draws):
        genotype = arch_to_genotype(supernet, sampler.sample(draw))
        key = repr(genotype)
        if key in seen:
            continue
        seen.add(key)
        params = network_params(genotype, budget)
        if abs(params / target - 1) <= band:
            kept.append({"name": f"random_{len(kept)}", "draw": draw, "genotype": genotype_to_dict(genotype),
                         "params": params})
            if len(kept) == count:
                return kept
    raise RuntimeError(f"only {len(kept)} of {max_draws} random genotypes lie within +-{band:.0%} of {target:.0f} "
                       "parameters; widen --band")


def run_retrain(name: str, genotype: dict, seed: int, budget: dict, workdir: Path) -> dict:
    """Held-out top-1 of ``genotype`` retrained with ``seed`` (cached in ``<workdir>/retrain/<name>_s<seed>.json``)."""
    from lightning_nd.cli import create_cli

    record_path = workdir / "retrain" / f"{name}_s{seed}.json"
    if (record := _cached(record_path, budget, RETRAIN_KEYS)) is not None and record["genotype"] == genotype:
        return record
    out = workdir / "runs" / f"retrain_{name}_s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(retrain_config(genotype, seed, budget, out)))
    start = time.perf_counter()
    cli = create_cli(["-c", str(out / "config.yaml")], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    acc = float(cli.trainer.callback_metrics["val/acc"])
    record = {"name": name, "seed": seed, "val_acc": acc, "genotype": genotype,
              "params": sum(p.numel() for p in cli.model.net.parameters()), "wall_s": time.perf_counter() - start,
              "steps": cli.trainer.global_step, "budget": {k: budget[k] for k in RETRAIN_KEYS}}
    _write_json(record_path, record)
    print(f"[darts_quality] {name} seed {seed}: val acc {acc:.4f} ({record['wall_s']:.0f} s)", flush=True)
    return record


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(searches: dict, randoms: list[dict], runs: dict, budget: dict, band: float, command: str,
           machine_line: str) -> tuple[str, list[dict], dict]:
    """Markdown, glance rows and the machine-readable summary of all retrains."""
    seeds = sorted({s for (_, s) in runs})
    rows: dict[str, dict] = {}
    for name in [*SEARCHES, "darts_v2", *[r["name"] for r in randoms]]:
        per_seed = {s: runs[(name, s)] for s in seeds if (name, s) in runs}
        accs = [100 * r["val_acc"] for r in per_seed.values()]
        mean, std = _mean_std(accs)
        rows[name] = {"mean": mean, "std": std, "acc": {s: 100 * r["val_acc"] for s, r in per_seed.items()},
                      "params": {s: r["params"] for s, r in per_seed.items()}}
    random_means = [rows[r["name"]]["mean"] for r in randoms]
    random_mean, random_spread = _mean_std(random_means)
    margin = rows["rlnas"]["mean"] - random_mean
    paired = {}
    for control in ("params", "min_params", "naswot", "darts_v2"):
        diffs = [rows["rlnas"]["acc"][s] - rows[control]["acc"][s] for s in seeds]
        paired[control] = {"per_seed": diffs, "mean": _mean_std(diffs)[0], "std": _mean_std(diffs)[1],
                           "ci95": t_interval(diffs) if len(diffs) > 1 else None}
    met = margin > random_spread
    wall_s = sum(r["wall_s"] for r in searches.values()) + sum(r["wall_s"] for r in runs.values())
    lines = [
        "# DARTS space: retrain quality of the RLNAS pick vs controls (issue 25)", "",
        f"Command: `{command}`", "", f"Machine: {machine_line}; wall time of all searches and retrains (summed "
        f"from their records): {wall_s / 60:.0f} min.", "",
        f"Budget (every genotype alike): DARTS network C={budget['C']}, {budget['layers']} cells, Fashion-MNIST "
        f"{budget['image_size']}x{budget['image_size']}x3, {budget['retrain_images']} training images x "
        f"{budget['retrain_epochs']} epochs (batch {budget['batch_size']}, configs/nas/retrain_darts.yaml recipe), "
        f"top-1 on {budget['val_size']} held-out training images. Searches: supernet of the same size; RLNAS trains "
        f"it {budget['search_epochs']} epochs on {budget['search_images']} random-labelled images; all four share "
        f"the EA {budget['ea']} and its seed. Random genotypes: uniform valid paths (seed {RANDOM_SEED}) rejected "
        f"unless their network has the RLNAS picks' mean parameter count +-{band:.0%}.", "",
        "| genotype | params (per seed) | top-1 % per seed | mean +- std |", "|---|---|---|---|",
    ]
    for name, row in rows.items():
        params = sorted(set(row["params"].values()))
        per_seed = ", ".join(f"s{s}: {a:.2f}" for s, a in row["acc"].items())
        lines.append(f"| {name} | {', '.join(f'{p:,}' for p in params)} | {per_seed} | "
                     f"{row['mean']:.2f} +- {row['std']:.2f} |")
    lines += [
        "", f"Random genotypes: mean {random_mean:.2f} %, spread (std of their seed means) {random_spread:.2f} "
        f"over {len(randoms)} genotypes.",
        f"**Target (RLNAS mean - random mean > random spread): {margin:+.2f} vs {random_spread:.2f} -> "
        f"{'met' if met else 'NOT met'}.**", "",
        "Paired differences per seed (same seed, same data order):", "",
        "| RLNAS - | per seed (points) | mean +- std | 95 % t-interval |", "|---|---|---|---|",  # params = max
    ]
    for control, p in paired.items():
        ci = f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]" if p["ci95"] else "-"
        lines.append(f"| {control} | {', '.join(f'{d:+.2f}' for d in p['per_seed'])} | "
                     f"{p['mean']:+.2f} +- {p['std']:.2f} | {ci} |")
    lines += ["", "Picks (normal / reduce cells):", ""]
    for (method, seed), record in sorted(searches.items()):
        g = record["genotype"]
        lines.append(f"- {method} s{seed} (score {record['score']:.4g}, {record['wall_s']:.0f} s): normal "
                     f"{[tuple(p) for p in g['normal']]}, reduce {[tuple(p) for p in g['reduce']]}")
    glance = [{"family": "NAS", "what": f"DARTS space, RLNAS pick retrained (C={budget['C']}, {budget['layers']} "
               f"cells, Fashion-MNIST, {budget['retrain_epochs']} epochs x {budget['retrain_images']} images): "
               "top-1 - random genotypes of similar size",
               "value": f"{margin:+.2f} points ({rows['rlnas']['mean']:.2f} vs {random_mean:.2f} %)",
               "spread": f"random spread {random_spread:.2f}; RLNAS std {rows['rlnas']['std']:.2f} over "
                         f"{len(seeds)} seeds; paired RLNAS - max-params control {paired['params']['mean']:+.2f} "
                         f"+- {paired['params']['std']:.2f}, - min-params control "
                         f"{paired['min_params']['mean']:+.2f} +- {paired['min_params']['std']:.2f}",
               "target": "> random spread"}]
    summary = {"rows": rows, "random_mean": random_mean, "random_spread": random_spread, "margin": margin,
               "target_met": met, "paired": paired, "budget": budget, "band": band}
    return "\n".join(lines) + "\n", glance, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny network, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--randoms", type=int, default=5, help="random genotypes of similar size")
    parser.add_argument("--band", type=float, default=0.15, help="relative parameter band of the random genotypes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/darts_quality"))
    parser.add_argument("--name", default=None, help="results file stem (default darts_quality[_quick])")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")
    parser.add_argument("--machine-note", default="", help="appended to the machine line, e.g. 'loaded by other jobs'")
    parser.add_argument("--size-seeds", type=int, nargs="+", default=None,
                        help="seeds whose RLNAS picks set the random genotypes' size (default --seeds); give the "
                             "full list when seeds run as separate processes, so that all draw the same genotypes")
    parser.add_argument("--retrain-images", type=int, default=None,
                        help=f"training images per retrain (default {FULL['retrain_images']}; the searches are reused)")
    parser.add_argument("--retrain-epochs", type=int, default=None,
                        help=f"epochs per retrain (default {FULL['retrain_epochs']}; the searches are reused)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    budget = dict(QUICK if args.quick else FULL)
    for key in ("retrain_images", "retrain_epochs"):  # a longer retrain reuses the searches (keyed by SEARCH_KEYS)
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                parser.error(f"--{key.replace('_', '-')} {value}: must be a positive integer")
            budget[key] = value
    seeds = [0] if args.quick and args.seeds == [0, 1, 2] else args.seeds
    workdir = args.workdir / ("quick" if args.quick else "full")
    searches = {(m, s): run_search(m, s, budget, workdir) for s in seeds for m in SEARCHES}
    size_seeds = args.size_seeds or seeds
    picks = [run_search("rlnas", s, budget, workdir)["genotype"] for s in size_seeds]
    target = statistics.fmean(network_params(genotype, budget) for genotype in picks)
    randoms_path = workdir / "random_genotypes.json"
    drawn = {"target": target, "band": args.band, "count": args.randoms, "C": budget["C"], "layers": budget["layers"]}
    saved = json.loads(randoms_path.read_text()) if randoms_path.is_file() else {}
    if {k: saved.get(k) for k in drawn} == drawn:
        randoms = saved["genotypes"]
    else:
        randoms = random_genotypes(args.randoms, target, args.band, budget)
        _write_json(randoms_path, {**drawn, "genotypes": randoms})
    runs = {}
    for s in seeds:
        for m in SEARCHES:
            runs[(m, s)] = run_retrain(f"{m}_s{s}", searches[(m, s)]["genotype"], s, budget, workdir)
        runs[("darts_v2", s)] = run_retrain("darts_v2", genotype_to_dict(GENOTYPES["darts_v2"]), s, budget, workdir)
        for r in randoms:
            runs[(r["name"], s)] = run_retrain(r["name"], r["genotype"], s, budget, workdir)
    command = "nice -n 10 python benchmarks/darts_quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine_line = machine() + (f", {args.machine_note}" if args.machine_note else "")
    markdown, glance, summary = report(searches, randoms, runs, budget, args.band, command.strip(), machine_line)
    print(markdown)
    if not args.no_write:
        name = args.name or ("darts_quality_quick" if args.quick else "darts_quality")
        path = write_results(name, markdown, command=command.strip(), glance=[] if args.quick else glance,
                             machine_line=machine_line)
        record = json.loads(path.with_suffix(".json").read_text())
        record["summary"] = json.loads(json.dumps(summary, default=str))
        _write_json(path.with_suffix(".json"), record)


if __name__ == "__main__":
    main()
