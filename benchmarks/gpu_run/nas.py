"""NAS part: an nb201 supernet at the paper's width on random labels of full Fashion-MNIST (32x32), trained for as
many steps as its budget allows; the angle (every AngleTracker preset this checkout has, with and without the
fixed layers) and NASWOT ranked against the NAS-Bench-201 table; EvolutionSearch's pick and its percentile."""

from __future__ import annotations

import inspect
import tempfile
import time
from typing import Any

import numpy as np
import torch

import lightning_nd.nas.angle as angle_module
from gpu_run.common import BudgetSchedule, DeviceBatches, PartContext, dataset_to_device, trainer
from lightning_nd.callbacks import AngleTracker, EvolutionSearch
from lightning_nd.datamodules import FashionMNISTDataModule, RandomLabels
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import build_space, naswot_score
from lightning_nd.nas.bench import NB201
from lightning_nd.nas.spaces.nb201 import str_to_arch


def angle_variants() -> dict[str, dict[str, Any]]:
    """AngleTracker keyword sets to compare, discovered from this checkout: every NB201 preset of
    ``ANGLE_PRESETS`` (if the tracker takes ``preset``), each also with ``cells_only`` (if it takes that)."""
    params = inspect.signature(AngleTracker).parameters
    presets = getattr(angle_module, "ANGLE_PRESETS", {}) if "preset" in params else {}
    same: dict[str, list[str]] = {}  # presets with the same vector are measured once, under all their names
    for name, vector in presets.items():
        if "nb201" in name:
            same.setdefault(repr(vector), []).append(name)
    base = {" = ".join(names): {"preset": names[0]} for names in same.values()}
    if not base:  # an older tracker: the loose flags of the NB201 vector (conv/linear weights, BN affine, biases)
        base = {"weights+BN affine+biases": {"include_bn_affine": True, "include_bias": True, "identity": "none"}}
    variants = dict(base)
    if "cells_only" in params:
        variants.update({f"{name}, cells only": {**kw, "cells_only": True} for name, kw in base.items()})
    return variants


def percentile(accuracy: float, all_accuracies: np.ndarray) -> float:
    """Share (%) of the benchmark's cells whose accuracy is at most ``accuracy``."""
    return float(100.0 * np.mean(all_accuracies <= accuracy))


def run(ctx: PartContext) -> None:
    from scipy.stats import kendalltau  # O(n log n): the tau over all 15,625 cells

    cfg, device = ctx.cfg, ctx.device
    bench = NB201()
    all_acc = bench.accuracies("cifar10")
    every = np.array([str_to_arch(bench.arch_str(i)) for i in range(len(bench))])
    cells = bench.sample(cfg.nas_cells, seed=cfg.seed)
    archs = [str_to_arch(c) for c in cells]
    variants = angle_variants()
    ctx.report(settings={
        "space": f"nb201 C={cfg.nas_C} N={cfg.nas_N} (cell BN affine=False, the official one-shot supernet)",
        "data": "Fashion-MNIST 32x32 (padded), gray replicated to 3 channels, random labels (RandomLabels, seed "
                f"{cfg.seed}), {cfg.nas_train_subset or 55000} training images",
        "optimizer": f"SGD nesterov 0.9, lr {cfg.nas_lr} (warm-up then cosine over the steps that fit), wd 5e-4, "
                     f"batch {cfg.nas_batch}",
        "cells": len(cells), "angle variants": list(variants), "precision": ctx.precision,
    })

    dm = RandomLabels(FashionMNISTDataModule(data_dir=str(cfg.data_dir), image_size=32, channels=1,
                                             train_subset=cfg.nas_train_subset), seed=cfg.seed)
    dm.setup("fit")
    x, y = dataset_to_device(dm.train_dataset, device)
    batches = DeviceBatches(x, y, cfg.nas_batch, channels=3, seed=cfg.seed)

    # NASWOT v2 of every sampled cell as a path of an untrained supernet of the same width, one fixed batch
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    init = build_space("nb201", num_classes=10, C=cfg.nas_C, N=cfg.nas_N, affine=False).to(device)
    xb = x[: cfg.naswot_batch].expand(-1, 3, -1, -1)
    naswot, stop = [], time.monotonic() + cfg.naswot_share * ctx.time_left()
    for a in archs:
        if time.monotonic() > stop:  # NASWOT may take a share of the budget, never the training's
            break
        naswot.append(naswot_score(init, xb, 2, arch=a))
    del init
    found = bench.correlate(cells[: len(naswot)], naswot, name="NASWOT v2") if len(naswot) >= 3 else None
    rows = {} if found is None else {"NASWOT v2 (untrained supernet path)": _row(found, all_acc)}
    ctx.report(ranking=rows, naswot={"cells scored": len(naswot), "seconds": round(time.perf_counter() - start, 1)})

    # the supernet, trained until the budget (minus the evaluation reserve) runs out
    torch.manual_seed(cfg.seed)
    model = SupernetModule("nb201", num_classes=10, space_kwargs={"C": cfg.nas_C, "N": cfg.nas_N, "affine": False},
                           seed=cfg.seed, calib_batches=0, lr_scheduler=None,
                           optimizer=lambda p: torch.optim.SGD(p, lr=cfg.nas_lr, momentum=0.9, nesterov=True,
                                                               weight_decay=5e-4))
    reference = {n: t.detach().clone() for n, t in model.net.state_dict().items()}
    search_kwargs = next(iter(variants.values()))
    tracker = AngleTracker(every_n_epochs=None, every_n_steps=10**9, heatmap=False, **search_kwargs)
    schedule = BudgetSchedule(time.monotonic() + ctx.time_left() - cfg.nas_reserve, len(batches),
                              calib_steps=cfg.calib_skip + cfg.calib_steps, calib_from=cfg.calib_skip,
                              max_steps=cfg.nas_max_steps, sync=ctx.sync)
    with tempfile.TemporaryDirectory() as tmp:
        search = EvolutionSearch(metric="angle", dirpath=tmp, seed=cfg.seed, resume=False,
                                 population=cfg.evo_population, generations=cfg.evo_generations,
                                 mutations=cfg.evo_population // 2, crossovers=cfg.evo_population // 2,
                                 top_k=max(2, cfg.evo_population // 5))
        start = time.perf_counter()
        fit = trainer(ctx, [tracker, search, schedule])
        fit.fit(model, train_dataloaders=batches)
        train_seconds = time.perf_counter() - start
    pick = search.result["best"]["nb201"] if search.result else None
    times = schedule.epoch_times
    ctx.report(training={
        "optimizer steps": fit.global_step, "epochs": round(fit.global_step / len(batches), 2),
        "seconds (incl. the search)": round(train_seconds, 1), "stopped by the deadline": schedule.stopped_by_deadline,
        "median s / epoch": round(float(np.median(times)), 2) if times else None,
        "planned steps (first plan, last plan)": (schedule.plans[0], schedule.plans[-1]) if schedule.plans else None,
    }, search=None if pick is None else {
        "angle vector": next(iter(variants)), "pick": pick["arch_str"], "cifar10 test acc": pick["cifar10"],
        "percentile among 15,625 cells": percentile(pick["cifar10"], all_acc),
    })

    # every angle variant from the same trained weights and the same initial weights
    net = model.net
    for name, kwargs in variants.items():
        tr = AngleTracker.from_reference(net, reference, every_n_epochs=None, every_n_steps=10**9, heatmap=False,
                                         **kwargs)
        tr.compute_statistics(net)
        sample = tr.path_angles(archs)
        whole = tr.path_angles(every)
        row = _row(bench.correlate(cells, sample.tolist(), name=name), all_acc)
        tau_all = kendalltau(whole, all_acc)[0]
        best = bench.arch_str(int(np.argmax(whole)))
        row.update({"kendall tau, all 15,625 cells": float(tau_all), "best of all cells": best,
                    "its acc": bench.accuracy(best), "its percentile": percentile(bench.accuracy(best), all_acc)})
        rows[f"angle: {name}"] = row
        ctx.report(ranking=rows)


def _row(corr: Any, all_acc: np.ndarray) -> dict[str, Any]:
    arch, acc = corr.pick
    return {"cells": len(corr.archs), "kendall tau": corr.kendall, "spearman rho": corr.spearman, "pick of the sample":
            arch, "pick acc": acc, "pick percentile": percentile(acc, all_acc)}


def render(record: dict[str, Any]) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in record.get("settings", {}).items()]
    if record.get("naswot"):
        lines.append(f"- NASWOT v2: {record['naswot']['cells scored']} cells scored in {record['naswot']['seconds']} s "
                     "(its share of the budget; at least 3 are needed for a row)")
    training = record.get("training")
    if training:
        lines += ["", "Training: " + ", ".join(f"{k} {v}" for k, v in training.items())]
    ranking = record.get("ranking") or {}
    if ranking:
        lines += ["", "| score | cells | Kendall tau | Spearman rho | tau over all 15,625 | pick of the sample (acc, "
                  "percentile) | best of all cells (acc, percentile) |", "|---|---|---|---|---|---|---|"]
        for name, r in ranking.items():
            whole = r.get("kendall tau, all 15,625 cells")
            best = f"`{r['best of all cells']}` ({r['its acc']:.2f}, {r['its percentile']:.1f})" if whole is not None \
                else "-"
            lines.append(f"| {name} | {r['cells']} | {r['kendall tau']:.3f} | {r['spearman rho']:.3f} | "
                         f"{'-' if whole is None else f'{whole:.3f}'} | `{r['pick of the sample']}` ({r['pick acc']:.2f}, "
                         f"{r['pick percentile']:.1f}) | {best} |")
    search = record.get("search")
    if search:
        lines += ["", f"EvolutionSearch(metric='angle', {search['angle vector']}): `{search['pick']}`, NAS-Bench-201 "
                  f"CIFAR-10 test acc {search['cifar10 test acc']:.2f} %, better than "
                  f"{search['percentile among 15,625 cells']:.1f} % of all cells."]
    return lines


def glance(record: dict[str, Any], device: str) -> list[dict[str, str]]:
    rows = []
    for name, r in (record.get("ranking") or {}).items():
        if name.startswith(("angle", "NASWOT")):
            target = "0.508 (RLNAS, CIFAR-10 supernet)" if name.startswith("angle") else \
                "0.642 (NASLib's published nwot on CIFAR-10 batches, 200 cells)"
            rows.append({"family": "NAS", "what": f"{name} vs NAS-Bench-201 CIFAR-10 (Kendall tau, {r['cells']} cells; "
                         f"Fashion-MNIST supernet, {device})", "value": f"{r['kendall tau']:.3f}",
                         "spread": "- (one seed: GPU time)", "target": target})
    return rows
