"""Implicit-model parts. ``mdeq``: MDEQ-tiny vs the equal-size ResNet of ``benchmarks/deq_fashion.py`` on full
Fashion-MNIST with the project's Lightning modules (accuracy, time per epoch, peak memory), the same number of
steps for both. ``deq_speed``: their training steps timed alone, interleaved. ``ifpn``: FPN vs i-FPN RetinaNets on
larger shapes images, with the initial weights of every shared module equal (``ifpn_shapes.share_initial_weights``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from gpu_run.common import (
    BudgetSchedule,
    DeviceBatches,
    PartContext,
    dataset_to_device,
    lr_factor,
    official_test,
    plan_steps,
    trainer,
)
from lightning_nd.callbacks import DEQWarmup
from lightning_nd.datamodules import FashionMNISTDataModule, ShapesDetectionDataModule
from lightning_nd.modules import DEQClassifier, ImageClassifier


def mdeq_setup(cfg: Any) -> tuple[str, dict[str, Any], int, Any]:
    """The MDEQ recipe of ``deq_fashion.py``: (name, MDEQ kwargs, unrolled warm-up steps, Jacobian schedule)."""
    import deq_fashion

    recipes = getattr(deq_fashion, "RECIPES", None)
    if not recipes:  # the benchmark before recipes: one configuration inside MDEQ_TINY
        return "baseline", dict(deq_fashion.MDEQ_TINY), 100, None
    name = cfg.mdeq_recipe if cfg.mdeq_recipe in recipes else "baseline"
    r = recipes[name]
    model = {**deq_fashion.MDEQ_TINY, **r.get("model", {})}  # a recipe may change MDEQ-tiny too (e.g. no dropout)
    return name, {**model, "deq": {**r["deq"], "unroll_layers": r["unroll_layers"]}}, r["warmup_steps"], r["jac"]


def models(cfg: Any) -> dict[str, tuple[Any, list]]:
    """Both classifiers (same seed) and their callbacks."""
    from deq_fashion import SmallResNet

    name, kwargs, warmup, jac = mdeq_setup(cfg)
    adam = lambda p: torch.optim.Adam(p, lr=cfg.mdeq_lr)  # noqa: E731
    torch.manual_seed(cfg.seed)
    mdeq = DEQClassifier(num_classes=10, in_chans=1, model_kwargs=kwargs, optimizer=adam, jac_reg=jac)
    torch.manual_seed(cfg.seed)
    resnet = ImageClassifier(SmallResNet(), num_classes=10, in_chans=1, optimizer=adam)
    warmup = warmup if cfg.mdeq_warmup_steps is None else cfg.mdeq_warmup_steps
    return {f"MDEQ-tiny ({name} recipe)": (mdeq, [DEQWarmup(warmup_steps=warmup)]), "ResNet (2 basic blocks)": (resnet, [])}


def fashion(ctx: PartContext) -> tuple[DeviceBatches, DeviceBatches]:
    cfg = ctx.cfg
    dm = FashionMNISTDataModule(data_dir=str(cfg.data_dir), train_subset=cfg.mdeq_train_subset)
    dm.setup("fit")
    x, y = dataset_to_device(dm.train_dataset, ctx.device)
    xt, yt = official_test(ctx, dm.test_dataset)
    return (DeviceBatches(x, y, cfg.mdeq_batch, seed=cfg.seed),
            DeviceBatches(xt, yt, 500, shuffle=False, drop_last=False))


def mdeq(ctx: PartContext) -> None:
    cfg = ctx.cfg
    train, test = fashion(ctx)
    built = models(cfg)
    ctx.report(settings={
        "data": f"Fashion-MNIST 28x28, {len(train.y)} training images (5,000 held out), {len(test.y)} official test images",
        "training": f"Adam lr {cfg.mdeq_lr} (warm-up, then cosine over the steps that fit), batch {cfg.mdeq_batch}, "
                    f"{ctx.precision}; the MDEQ trains first within {100 * cfg.mdeq_share:.0f} % of the budget, the "
                    "ResNet then runs the same number of steps",
        "timing": "trained while the other training parts share the device: time per epoch is under sharing; the "
                  "deq_speed part times both alone" if cfg.parallel else "trained alone on the device",
    }, rows=[])
    rows, max_steps = [], cfg.mdeq_max_steps
    for i, (name, (module, callbacks)) in enumerate(built.items()):
        span = ctx.time_left() - cfg.mdeq_reserve
        deadline = time.monotonic() + (cfg.mdeq_share * span if i == 0 else span)
        # time the equilibrium steps, not the unrolled ones, after a few that load the solver's kernels
        start_at = (callbacks[0].warmup_steps if callbacks else 0) + cfg.calib_skip
        schedule = BudgetSchedule(deadline, len(train), calib_steps=start_at + cfg.calib_steps, calib_from=start_at,
                                  max_steps=max_steps, sync=ctx.sync)
        ctx.reset_peak_memory()
        fit = trainer(ctx, [schedule, *callbacks])
        start = time.perf_counter()
        fit.fit(module, train_dataloaders=train)
        seconds = time.perf_counter() - start
        peak = ctx.peak_memory()
        max_steps = fit.global_step  # the ResNet trains as many steps as the MDEQ did
        acc = fit.test(module, dataloaders=test, verbose=False)[0]["test/acc"]
        rows.append({"model": name, "params": sum(p.numel() for p in module.parameters()), "steps": fit.global_step,
                     "epochs": round(fit.global_step / len(train), 2), "test acc": acc, "train s": seconds,
                     "s / epoch": schedule.epoch_times, "peak MiB": peak, "planned steps": schedule.plans})
        ctx.report(rows=rows)


def render_mdeq(record: dict[str, Any]) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in record.get("settings", {}).items()]
    rows = record.get("rows") or []
    if rows:
        lines += ["", "| model | params | steps (epochs) | test acc % | s / epoch (complete epochs) | peak GPU MiB "
                  "(training, above the resident data) |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            per = ", ".join(f"{t:.1f}" for t in r["s / epoch"]) or f"- ({r['train s']:.1f} s in all)"
            peak = "-" if r["peak MiB"] is None else f"{r['peak MiB']:.0f}"
            lines.append(f"| {r['model']} | {r['params']:,} | {r['steps']} ({r['epochs']}) | {100 * r['test acc']:.2f} "
                         f"| {per} | {peak} |")
    return lines


def glance_mdeq(record: dict[str, Any], device: str) -> list[dict[str, str]]:
    rows = record.get("rows") or []
    if len(rows) < 2:
        return []
    m, r = rows[:2]
    return [{"family": "Implicit", "what": f"{m['model']} - ResNet test accuracy, {record['settings']['data']}, "
             f"{m['steps']} vs {r['steps']} steps ({device})", "value": f"{100 * (m['test acc'] - r['test acc']):+.2f} pt",
             "spread": "- (one seed: GPU time)", "target": ">= 0 at equal parameters (MDEQ paper)"}]


def deq_speed(ctx: PartContext) -> None:
    """Training steps of both networks, alone on the device, interleaved; peak memory of each."""
    cfg = ctx.cfg
    train, _ = fashion(ctx)
    batch = next(iter(train))
    del train  # only this batch stays on the device
    rows: dict[str, dict[str, Any]] = {}
    nets = {}
    for name, (module, _) in models(cfg).items():
        net = module.net.to(ctx.device).train()
        nets[name] = (net, torch.optim.Adam(net.parameters(), lr=cfg.mdeq_lr))

    def step(name: str) -> float:
        net, opt = nets[name]
        ctx.sync()
        t0 = time.perf_counter()
        with ctx.autocast():
            loss = F.cross_entropy(net(batch[0]), batch[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ctx.sync()
        return time.perf_counter() - t0

    for name in nets:  # warm-up and peak memory, one model at a time
        ctx.reset_peak_memory()
        for _ in range(cfg.speed_warmup):
            step(name)
        rows[name] = {"peak MiB": ctx.peak_memory(), "step s": []}
    ctx.report(settings={"protocol": f"batch {cfg.mdeq_batch}, {ctx.precision}, equilibrium mode (no unrolled "
                         f"warm-up, no Jacobian regularisation), up to {cfg.deq_speed_steps} interleaved steps after "
                         f"{cfg.speed_warmup} warm-up steps; peak memory of the warm-up steps above what was resident"})
    for i in range(cfg.deq_speed_steps):
        if i >= 3 and ctx.time_left() < 0:
            break
        for name in nets:
            rows[name]["step s"].append(step(name))
        ctx.report(rows=rows)


def render_deq_speed(record: dict[str, Any]) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in record.get("settings", {}).items()]
    rows = record.get("rows") or {}
    if rows:
        base = statistics.median(list(rows.values())[-1]["step s"])
        lines += ["", "| model | steps | ms / training step (median, min-max) | vs ResNet | peak GPU MiB |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            t = r["step s"]
            peak = "-" if r["peak MiB"] is None else f"{r['peak MiB']:.0f}"
            lines.append(f"| {name} | {len(t)} | {1000 * statistics.median(t):.2f} ({1000 * min(t):.2f}-{1000 * max(t):.2f}) | "
                         f"x{statistics.median(t) / base:.2f} | {peak} |")
    return lines


def glance_deq_speed(record: dict[str, Any], device: str) -> list[dict[str, str]]:
    rows = record.get("rows") or {}
    if len(rows) < 2:
        return []
    (mdeq_name, m), (_, r) = list(rows.items())[:2]
    ratio = statistics.median(m["step s"]) / statistics.median(r["step s"])
    lo, hi = min(m["step s"]) / max(r["step s"]), max(m["step s"]) / min(r["step s"])
    return [{"family": "Implicit", "what": f"{mdeq_name} / ResNet time per training step, Fashion-MNIST "
             f"({device}, alone)", "value": f"x{ratio:.2f}",
             "spread": f"x{lo:.2f}-x{hi:.2f} (worst/best steps)", "target": "-"}]


def ifpn(ctx: PartContext) -> None:
    from ifpn_shapes import share_initial_weights

    from lightning_nd.datamodules.shapes_detection import detection_collate
    from lightning_nd.modules.detection import build_detector, coco_map

    cfg = ctx.cfg
    size = cfg.ifpn_size
    data = ShapesDetectionDataModule(num_train=cfg.ifpn_train, num_val=cfg.ifpn_val, image_size=size,
                                     min_object_size=size // 8, max_object_size=size * 3 // 7, seed=cfg.seed)

    def to_device(split: str) -> list:
        ds = data.dataset(split)
        return [(img.to(ctx.device), {k: v.to(ctx.device) for k, v in tgt.items()}) for img, tgt in ds]

    train, val = to_device("train"), to_device("val")
    nets = {}
    for neck in ("fpn", "ifpn"):
        torch.manual_seed(cfg.seed)
        nets[neck] = build_detector("retinanet", num_classes=4, backbone="resnet18", neck=neck, returned_layers=[2, 3],
                                    out_channels=64, min_size=size, max_size=size).to(ctx.device)
    share_initial_weights(nets["fpn"], nets["ifpn"])  # raises if anything shared differs after the copy
    opts = {k: torch.optim.AdamW(n.parameters(), lr=cfg.ifpn_lr, weight_decay=1e-4) for k, n in nets.items()}
    ctx.report(settings={
        "detector": "torchvision RetinaNet, ResNet-18 to layer3 from scratch, 64 channels, P6/P7, GroupNorm head; "
                    "backbone, lateral projections, P6/P7 and head start from equal weights",
        "data": f"shapes, {size}x{size} px, objects {size // 8}-{size * 3 // 7} px, {cfg.ifpn_train} training and "
                f"{cfg.ifpn_val} validation images",
        "training": f"AdamW lr {cfg.ifpn_lr} (warm-up, then cosine over the steps that fit), batch {cfg.ifpn_batch}, "
                    f"{ctx.precision}; both necks in lockstep on the same batches; evaluation in float32",
    })
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    step_s: dict[str, list[float]] = {k: [] for k in nets}
    nfe: list[tuple[int, int]] = []
    total, step, plans = None, 0, []
    skip, calib = cfg.calib_skip, cfg.calib_skip + cfg.calib_steps  # as BudgetSchedule: the first steps untimed
    while total is None or step < total:
        if ctx.time_left() < cfg.ifpn_reserve:
            break
        if len(order) < cfg.ifpn_batch:
            order += torch.randperm(len(train), generator=gen).tolist()
        images, targets = detection_collate([train[i] for i in order[: cfg.ifpn_batch]])
        del order[: cfg.ifpn_batch]
        factor = lr_factor(step, calib, total)
        for neck, net in nets.items():
            for group in opts[neck].param_groups:
                group["lr"] = cfg.ifpn_lr * factor
            net.train()
            ctx.sync()
            t0 = time.perf_counter()
            with ctx.autocast():
                loss = sum(net(images, targets).values())
            opts[neck].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opts[neck].step()
            ctx.sync()
            step_s[neck].append(time.perf_counter() - t0)
        stats = getattr(nets["ifpn"].backbone.fpn, "last_stats", None)
        if stats is not None:
            nfe.append((stats.forward.nfe, stats.backward.nfe if stats.backward is not None else 0))
        step += 1
        if step == calib or (total is not None and step < total and (step - calib) % (4 * cfg.calib_steps) == 0):
            # (re)plan from the mean step time after the first `skip` steps: the i-FPN's solver cost drifts as it
            # trains and the other parts' load on the GPU changes
            per_step = sum(sum(t[skip:]) for t in step_s.values()) / (step - skip)
            total = plan_steps(step, per_step, ctx.time_left() - cfg.ifpn_reserve, 10**9, cfg.ifpn_max_steps)
            plans.append(total)
    if not step:
        ctx.report(note="no training step fit in the budget")
        return
    rows = {}
    for neck, net in nets.items():
        net.eval()
        metric, eval_s = coco_map(), []
        with torch.no_grad():
            for lo in range(0, len(val), cfg.ifpn_batch):
                images, targets = detection_collate(val[lo : lo + cfg.ifpn_batch])
                ctx.sync()
                t0 = time.perf_counter()
                preds = net(images)
                ctx.sync()
                eval_s.append((time.perf_counter() - t0) / len(images))
                metric.update([{k: v.float().cpu() for k, v in p.items()} for p in preds],
                              [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in targets])
        result = metric.compute()
        rows[neck] = {"map": float(result["map"]), "map_50": float(result["map_50"]), "steps": step,
                      "step ms": 1000 * statistics.median(step_s[neck]), "eval ms / image": 1000 * statistics.median(eval_s),
                      "neck params": sum(p.numel() for p in net.backbone.fpn.parameters()), "planned steps": plans}
        ctx.report(rows=rows, ifpn_nfe=[statistics.mean(f for f, _ in nfe), statistics.mean(b for _, b in nfe)]
                   if nfe else None)


def render_ifpn(record: dict[str, Any]) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in record.get("settings", {}).items()]
    rows = record.get("rows") or {}
    if rows:
        lines += ["", "| neck | mAP | mAP@50 | steps | ms / train step | ms / image (eval) | neck params |",
                  "|---|---|---|---|---|---|---|"]
        for neck, r in rows.items():
            lines.append(f"| {neck} | {r['map']:.3f} | {r['map_50']:.3f} | {r['steps']} | {r['step ms']:.1f} | "
                         f"{r['eval ms / image']:.2f} | {r['neck params']:,} |")
        if record.get("ifpn_nfe"):
            f, b = record["ifpn_nfe"]
            lines.append(f"\ni-FPN solver evaluations per training step: forward {f:.1f}, backward {b:.1f} (mean).")
    return lines


def glance_ifpn(record: dict[str, Any], device: str) -> list[dict[str, str]]:
    rows = record.get("rows") or {}
    if "fpn" not in rows or "ifpn" not in rows:
        return []
    f, i = rows["fpn"], rows["ifpn"]
    return [{"family": "Implicit", "what": f"i-FPN - FPN mAP, RetinaNet on shapes, equal shared init ({device})",
             "value": f"{i['map'] - f['map']:+.3f}", "spread": "- (one seed: GPU time)", "target": "> 0 (i-FPN paper)"}]
