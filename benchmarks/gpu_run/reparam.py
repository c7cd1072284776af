"""Re-parameterization parts. ``accuracy``: the same deploy CNN (``benchmarks/reparam_accuracy.py``'s ``plain_net``)
trained plain / ACB / DBB / RepVGG-style on full Fashion-MNIST over several seeds, fused, and checked: deploy
accuracy = training-form accuracy. ``speed``: RepVGG-A0 at 224 px, training form vs deploy form, on the device."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from gpu_run.common import PartContext, dataset_to_device, official_test, timed
from lightning_nd.datamodules import FashionMNISTDataModule
from lightning_nd.reparam import convert_model, reparameterize_model, repvgg_a0

VARIANTS = ("plain", "acb", "dbb", "repvgg")


def build(variant: str) -> torch.nn.Module:
    from reparam_accuracy import plain_net  # the CPU benchmark's network: results stay comparable

    net = plain_net()
    return net if variant == "plain" else convert_model(net, variant)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Float32 test accuracy and logits (no autocast, no TF32: the deploy check compares exact forms)."""
    model.eval()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        logits = torch.cat([model(x[i : i + 1000]).float() for i in range(0, len(x), 1000)])
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return (logits.argmax(1) == y).float().mean().item(), logits


def train(ctx: PartContext, variant: str, seed: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    """SGD nesterov, lr 0.1 with cosine decay, wd 5e-4 on weights, random flips: reparam_accuracy.py's recipe."""
    cfg = ctx.cfg
    torch.manual_seed(seed)
    model = build(variant).to(ctx.device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                          lr=cfg.reparam_lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    per_epoch = len(y) // cfg.reparam_batch
    model.train()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(y), generator=g, device=ctx.device)
        idx = order[(step % per_epoch) * cfg.reparam_batch : (step % per_epoch + 1) * cfg.reparam_batch]
        xb = x[idx]
        flip = torch.rand(len(idx), generator=g, device=ctx.device) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        with ctx.autocast():
            loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


def accuracy(ctx: PartContext) -> None:
    cfg = ctx.cfg
    dm = FashionMNISTDataModule(data_dir=str(cfg.data_dir), train_subset=cfg.reparam_train_subset)
    dm.setup("fit")
    x, y = dataset_to_device(dm.train_dataset, ctx.device)
    xt, yt = official_test(ctx, dm.test_dataset)
    per_epoch = len(y) // cfg.reparam_batch
    data = f"Fashion-MNIST, {len(y)} training images (5,000 held out), {len(yt)} official test images"
    ctx.report(settings={"data": data})
    # equal epochs for every run: as many as the budget allows, from a timed calibration of each variant, after an
    # untimed one (on a GPU the first steps of each variant load its kernels: a second or so, many times a step)
    for v in VARIANTS:
        train(ctx, v, 0, x, y, cfg.calib_skip)
    calib = {v: timed(lambda v=v: train(ctx, v, 0, x, y, cfg.calib_steps), ctx.sync) / cfg.calib_steps
             for v in VARIANTS}
    runs_budget = ctx.time_left() - cfg.reparam_reserve
    epochs = max(1, min(cfg.reparam_max_epochs,
                        int(0.9 * runs_budget / (cfg.reparam_seeds * per_epoch * sum(calib.values())))))
    ctx.report(settings={
        "data": data,
        "schedule": f"{epochs} epochs x {per_epoch} steps, batch {cfg.reparam_batch}, SGD nesterov lr {cfg.reparam_lr} "
                    f"cosine, wd 5e-4 on weights, random flips, {ctx.precision} training, float32 evaluation",
        "seeds planned": cfg.reparam_seeds, "calibrated ms/step": {v: round(1000 * t, 2) for v, t in calib.items()},
    }, runs=[])
    runs = []
    for seed in range(cfg.reparam_seeds):
        for variant in VARIANTS:
            expected = calib[variant] * epochs * per_epoch * 1.5
            if ctx.time_left() < expected + 2:
                ctx.report(runs=runs, note=f"stopped before seed {seed} {variant}: the budget would not hold it")
                return
            start = time.perf_counter()
            model = train(ctx, variant, seed, x, y, epochs * per_epoch)
            ctx.sync()
            seconds = time.perf_counter() - start
            acc, logits = evaluate(model, xt, yt)
            deploy = model if variant == "plain" else reparameterize_model(model.eval(), fold_bn=True)
            acc_deploy, logits_deploy = evaluate(deploy, xt, yt)
            runs.append({"variant": variant, "seed": seed, "acc": acc, "acc_deploy": acc_deploy, "seconds": seconds,
                         "rel_err": ((logits - logits_deploy).abs().max() / logits.abs().max()).item(),
                         "params": [sum(p.numel() for p in m.parameters()) for m in (model, deploy)]})
            ctx.report(runs=runs)


def render_accuracy(record: dict[str, Any]) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in record.get("settings", {}).items()]
    runs = record.get("runs") or []
    if runs:
        lines += ["", "| variant | seeds | test acc % mean | std | min | max | deploy acc == train-form acc | max rel. "
                  "logit error | params train -> deploy | s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            rs = [r for r in runs if r["variant"] == v]
            if rs:
                accs = [100 * r["acc"] for r in rs]
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                same = all(r["acc"] == r["acc_deploy"] for r in rs)
                lines.append(f"| {v} | {len(rs)} | {statistics.mean(accs):.2f} | {std:.2f} | {min(accs):.2f} | "
                             f"{max(accs):.2f} | {'yes' if same else 'NO'} | {max(r['rel_err'] for r in rs):.1e} | "
                             f"{rs[0]['params'][0]:,} -> {rs[0]['params'][1]:,} | "
                             f"{statistics.mean(r['seconds'] for r in rs):.1f} |")
    return lines


def glance_accuracy(record: dict[str, Any], device: str) -> list[dict[str, str]]:
    runs = record.get("runs") or []
    plain = [100 * r["acc"] for r in runs if r["variant"] == "plain"]
    rows = []
    for v in VARIANTS[1:]:
        accs = [100 * r["acc"] for r in runs if r["variant"] == v]
        if accs and plain:
            gain = statistics.mean(accs) - statistics.mean(plain)
            rows.append({"family": "Re-parameterization", "what": f"{v} - plain test accuracy, same deploy CNN, "
                         f"{record['settings']['data']} ({device})", "value": f"{gain:+.2f} pt",
                         "spread": f"{len(accs)} seed(s), "
                         f"{v} {min(accs):.2f}-{max(accs):.2f} %, plain {min(plain):.2f}-{max(plain):.2f} %",
                         "target": "> 0 (ACB/DBB/RepVGG papers)"})
    return rows


@torch.no_grad()
def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    from reparam_speed import randomize_bn as randomize  # the CPU benchmark's protocol: non-trivial BN statistics

    randomize(model, seed)


def speed(ctx: PartContext) -> None:
    cfg = ctx.cfg
    torch.manual_seed(0)
    ours = repvgg_a0()
    randomize_bn(ours)
    ours = ours.eval().to(ctx.device)
    forms = {"train form": ours, "deploy": reparameterize_model(ours)}
    x = torch.randn(cfg.speed_batch, 3, cfg.speed_size, cfg.speed_size, device=ctx.device)
    _, ref = evaluate(forms["train form"], x, torch.zeros(len(x), dtype=torch.long, device=ctx.device))
    _, dep = evaluate(forms["deploy"], x, torch.zeros(len(x), dtype=torch.long, device=ctx.device))
    rel = ((ref - dep).abs().max() / ref.abs().max()).item()
    ctx.report(settings={"model": "RepVGG-A0 (lightning_nd.reparam.repvgg_a0, BN statistics randomised)",
                         "input": f"batch {cfg.speed_batch} x 3 x {cfg.speed_size} x {cfg.speed_size}, channels_last",
                         "protocol": f"inference_mode, median of up to {cfg.speed_rounds} interleaved rounds after "
                                     f"{cfg.speed_warmup} warm-up forwards, synchronised timers"
                                     + (", cudnn.benchmark" if ctx.device.type == "cuda" else "")},
               rel_err_fp32=rel, rows=[])
    rows = []
    # fixed shapes: let cuDNN pick its fastest algorithms in the warm-up forwards (after the fusion check above, which
    # keeps the default algorithms; this part runs in its own process)
    torch.backends.cudnn.benchmark = True
    precisions = [("float32", None)] if ctx.device.type == "cpu" else \
        [("bf16 autocast", ctx.autocast), ("float32 (TF32 allowed)", None)]
    for label, autocast in precisions:
        if rows and ctx.time_left() < 0:
            break
        rows.append(_time_forms(ctx, forms, x, label, autocast))
        ctx.report(rows=rows)
    if cfg.compile and ctx.device.type == "cuda" and ctx.time_left() > 0:
        try:  # an extra row: a compiler that fails here (no C compiler, a Triton error) must not fail the part
            compiled = {name: torch.compile(m) for name, m in forms.items()}
            rows.append(_time_forms(ctx, compiled, x, "bf16 autocast, torch.compile", ctx.autocast))
        except Exception as err:
            ctx.report(note=f"torch.compile row skipped: {type(err).__name__}: {str(err)[:500]}")
        else:
            ctx.report(rows=rows)


def _time_forms(ctx: PartContext, forms: dict, x: torch.Tensor, label: str, autocast: Any) -> dict[str, Any]:
    x = x.contiguous(memory_format=torch.channels_last)
    forms = {k: m.to(memory_format=torch.channels_last) for k, m in forms.items()}
    times: dict[str, list[float]] = {k: [] for k in forms}
    warm = {}
    with torch.inference_mode():
        for k, m in forms.items():
            with autocast() if autocast else torch.autocast(ctx.device.type, enabled=False):
                warm[k] = timed(lambda m=m: [m(x) for _ in range(ctx.cfg.speed_warmup)], ctx.sync)
        for i in range(ctx.cfg.speed_rounds):
            if i >= 3 and ctx.time_left() < 0:  # fewer rounds rather than none: the table says how many
                break
            for k, m in forms.items():
                with autocast() if autocast else torch.autocast(ctx.device.type, enabled=False):
                    times[k].append(timed(lambda m=m: m(x), ctx.sync))
    ips = {k: len(x) / statistics.median(t) for k, t in times.items()}
    spread = {k: (len(x) / max(t), len(x) / min(t)) for k, t in times.items()}
    return {"precision": label, "img/s": ips, "range": spread, "warm-up s": warm, "rounds": len(times["deploy"]),
            "deploy / train form": ips["deploy"] / ips["train form"]}


def render_speed(record: dict[str, Any]) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in record.get("settings", {}).items()]
    if "rel_err_fp32" in record:
        lines.append(f"- max relative output error after fusion (float32, TF32 off): {record['rel_err_fp32']:.1e}")
    rows = record.get("rows") or []
    if rows:
        lines += ["", "| precision | rounds | train form img/s (min-max) | deploy img/s (min-max) | deploy / train form "
                  "| warm-up s (train / deploy) |", "|---|---|---|---|---|---|"]
        for r in rows:
            cell = {k: f"{r['img/s'][k]:.0f} ({r['range'][k][0]:.0f}-{r['range'][k][1]:.0f})" for k in r["img/s"]}
            lines.append(f"| {r['precision']} | {r['rounds']} | {cell['train form']} | {cell['deploy']} | "
                         f"x{r['deploy / train form']:.2f} | {r['warm-up s']['train form']:.1f} / "
                         f"{r['warm-up s']['deploy']:.1f} |")
    return lines


def glance_speed(record: dict[str, Any], device: str) -> list[dict[str, str]]:
    rows = record.get("rows") or []
    if not rows:
        return []
    r = rows[0]
    lo = r["range"]["deploy"][0] / r["range"]["train form"][1]
    hi = r["range"]["deploy"][1] / r["range"]["train form"][0]
    size = record.get("settings", {}).get("input", "")
    return [{"family": "Re-parameterization", "what": f"RepVGG-A0 deploy / train-form inference ({size}), "
             f"{r['precision']} ({device})", "value": f"x{r['deploy / train form']:.2f}",
             "spread": f"x{lo:.2f}-x{hi:.2f} (worst/best rounds)", "target": ">= 1.8 (RepVGG paper, GPU)"}]
