"""FPN vs implicit FPN (i-FPN) in a torchvision RetinaNet on synthetic shapes, at the same training budget.

Both detectors share everything but the neck: a from-scratch ResNet-18 truncated after ``layer3`` (C3, C4),
P6/P7 extra levels, a GroupNorm RetinaNet head, 64 pyramid channels, the same data order, optimizer and number of
steps, and the same **initial weights** for every module they have in common (backbone, lateral 1x1 projections,
P6/P7 and head are copied from the first detector into the others and checked equal). Reported per neck: COCO mAP / mAP@50 on held-out images (pycocotools thresholds), neck and total
parameters, forward and backward solver evaluations of the i-FPN (mean over training steps), and time per training
step and per evaluated image (medians; the ratio against FPN measured in the same run is the meaningful number).

For every i-FPN neck the trained cell is also evaluated applied once from zero (``map_one``) and solved to its
equilibrium (``map_eq``), and :func:`~lightning_nd.implicit.diagnostics.diagnose_equilibrium` reports its contraction
estimate and the relative gap between one application and the solution, every ``--diag-every`` steps during
training and at the end. ``benchmarks/results/<name>.json`` gets ``steps``, ``seeds`` and ``map`` (per neck, in seed
order) plus ``map_one``, ``map_eq``, ``contraction``, ``gap`` and ``step_s`` per neck and seed.

Usage::

    python benchmarks/ifpn_shapes.py --quick    # a smoke run (about a minute)
    python benchmarks/ifpn_shapes.py --steps 1500 --necks fpn,ifpn,ifpn_explicit --seeds 0 1 2 3 4 5   # the deciding run

Neck names (``NECKS``): ``fpn`` (torchvision), ``ifpn`` (``ImplicitFPN`` defaults: the residual cell of issue 22,
P3-P7 inside the equilibrium, Anderson 12 / 12 at relative tolerance 5e-2), ``ifpn_explicit`` (the same cell and
parameters applied once from zero with plain backprop: the explicit control), ``ifpn_unrolled4`` (the same cell
applied 4 times, weight-tied, plain backprop: explicit at the i-FPN's number of evaluations), ``ifpn_outside`` (P6/P7 on the
equilibrium's output, as torchvision places them) and ``ifpn_jr`` (the defaults trained with the Jacobian
regularisation schedule of ``DetectionModule(jac_reg=...)``).

mAP after a few hundred steps is noisy: it moves by several points between seeds, and within one seed between
settings that barely differ, because the solver's stopping decisions turn the last bits into different trajectories.
Compare settings by their mean over seeds and against the spread. The shared initial weights are those of the first
neck in ``--necks`` (built from the seed), so runs compare equal only with the same first neck (``fpn`` in every
reported run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_stats import t_interval
from results_io import RESULTS_DIR, write_results

from lightning_nd.datamodules import ShapesDetectionDataModule
from lightning_nd.datamodules.shapes_detection import detection_collate
from lightning_nd.implicit.diagnostics import diagnose_equilibrium
from lightning_nd.implicit.jacobian import JacobianSchedule, jacobian_step
from lightning_nd.modules.detection import build_detector, coco_map

JR = JacobianSchedule(weight=0.5, prob=0.25, cap_jitter=2, seed=0)
ONE_APPLICATION = {"mode": "unrolled", "unroll_layers": 1}
NECKS: dict[str, tuple[str, dict, JacobianSchedule | None, str]] = {
    # name: (neck, ImplicitFPN options, Jacobian-regularisation schedule, what it is)
    "fpn": ("fpn", {}, None, "torchvision's FeaturePyramidNetwork"),
    "ifpn": ("ifpn", {}, None, "`ImplicitFPN` defaults (residual cell, P3-P7 inside the equilibrium, Anderson "
             "at rel 5e-2, caps 12 / 12, exact implicit gradient)"),
    "ifpn_explicit": ("ifpn", ONE_APPLICATION, None, "the same cell and parameters applied once from zero with "
                      "plain backprop (the explicit control)"),
    "ifpn_unrolled4": ("ifpn", {"mode": "unrolled", "unroll_layers": 4}, None, "the same cell applied 4 times from "
                       "zero, weight-tied, with plain backprop (an explicit control with the i-FPN's ~4 evaluations)"),
    "ifpn_outside": ("ifpn", {"extra_inside": False}, None, "the defaults with P6/P7 computed outside the "
                     "equilibrium, on its output (as torchvision's FPN does)"),
    "ifpn_jr": ("ifpn", {}, JR, "the defaults with Jacobian regularisation, as `DetectionModule(jac_reg=...)` "
                "applies it (weight 0.5 on 25 % of the steps, forward cap jittered -2..+1 on those)"),
}
NECK_KWARGS = {name: (kind, kwargs) for name, (kind, kwargs, _, _) in NECKS.items()}
JAC_SCHEDULES = {name: jac for name, (_, _, jac, _) in NECKS.items() if jac is not None}
SHARED = ("backbone.body", "backbone.fpn.inner_blocks", "backbone.fpn.extra_blocks", "head")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def share_initial_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every module the two detectors have in common (all but the neck's fusion) from ``src`` into ``dst``."""
    for path in SHARED:
        a, b = src.get_submodule(path), dst.get_submodule(path)
        b.load_state_dict(a.state_dict())
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            if not torch.equal(x, y):
                raise RuntimeError(f"{path}.{name} differs after copying")


class Runner:
    """One detector, its optimizer and its measurements."""

    def __init__(self, neck: str, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.neck = neck
        kind, kwargs = NECK_KWARGS[neck]
        self.jac = JAC_SCHEDULES.get(neck)
        self.jac_steps = 0
        self.net = build_detector("retinanet", num_classes=4, backbone="resnet18", neck=kind, returned_layers=[2, 3],
                                  out_channels=64, min_size=args.image_size, max_size=args.image_size,
                                  neck_kwargs=kwargs)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=1e-4)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=args.lr, total_steps=args.steps,
                                                         pct_start=0.1)
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.f_nfe: list[int] = []
        self.b_nfe: list[int] = []
        self.contraction_trace: list[tuple[int, float, float]] = []  # (step, contraction, gap) at log steps

    def stats(self):
        return getattr(self.net.backbone.fpn, "last_stats", None)

    def train_step(self, images: list, targets: list) -> None:
        self.net.train()
        start = time.perf_counter()
        if self.jac is None:
            loss = sum(self.net(images, targets).values())
        else:  # what DetectionModule.training_step does with jac_reg (the same helper)
            with jacobian_step(self.net, self.jac, len(self.step_times), 0) as jac:
                loss = sum(self.net(images, targets).values())
            if jac.loss is not None:
                loss = loss + jac.weight * jac.loss
                self.jac_steps += 1
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
        self.opt.step()
        self.sched.step()
        self.step_times.append(time.perf_counter() - start)
        self.losses.append(float(loss.detach()))
        if self.stats() is not None:
            self.f_nfe.append(self.stats().forward.nfe)
            self.b_nfe.append(self.stats().backward.nfe if self.stats().backward is not None else 0)

    def _map(self, val, batch_size: int) -> tuple[dict, list[float], list[float]]:
        self.net.eval()
        metric, eval_times, eval_nfe = coco_map(), [], []
        with torch.no_grad():
            for lo in range(0, len(val), batch_size):
                images, targets = detection_collate([val[i] for i in range(lo, min(lo + batch_size, len(val)))])
                t0 = time.perf_counter()
                preds = self.net(images)
                eval_times.append((time.perf_counter() - t0) / len(images))
                if self.stats() is not None:
                    eval_nfe.append(self.stats().forward.nfe)
                metric.update(preds, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        return metric.compute(), eval_times, eval_nfe

    def diagnose(self, images: list) -> dict[str, float]:
        """Contraction estimate and one-application gap of the neck's DEQ, solved as in training's eval mode."""
        deq = self.net.backbone.fpn.deq
        saved = deq.mode
        deq.mode = "equilibrium"
        self.net.eval()
        try:
            report = diagnose_equilibrium(self.net, lambda: self.net(images), iters=20,
                                          generator=torch.Generator().manual_seed(0))["backbone.fpn.deq"]
        finally:
            deq.mode = saved
        return {"contraction": report.contraction, "gap": report.gap}

    def evaluate(self, val, batch_size: int) -> dict[str, float]:
        result, eval_times, eval_nfe = self._map(val, batch_size)
        extra: dict[str, float] = {}
        deq = getattr(self.net.backbone.fpn, "deq", None)
        if deq is not None:  # the trained cell used once from zero, and solved to its equilibrium
            saved_mode, saved_layers = deq.mode, deq.config.unroll_layers
            try:
                deq.mode, deq.config.unroll_layers = "unrolled", 1
                extra["map_one"] = float(self._map(val, batch_size)[0]["map"])
                deq.mode = "equilibrium"
                extra["map_eq"] = float(self._map(val, batch_size)[0]["map"])
            finally:
                deq.mode, deq.config.unroll_layers = saved_mode, saved_layers
            images, _ = detection_collate([val[i] for i in range(min(batch_size, len(val)))])
            extra.update(self.diagnose(images))
            extra["contraction_trace"] = self.contraction_trace
        return {
            "map": float(result["map"]),
            "map_50": float(result["map_50"]),
            **extra,
            "neck_params": count(self.net.backbone.fpn),
            "total_params": count(self.net),
            "f_nfe": statistics.mean(self.f_nfe) if self.f_nfe else 0.0,
            "b_nfe": statistics.mean(self.b_nfe) if self.b_nfe else 0.0,
            "f_nfe_max": max(self.f_nfe, default=0),
            "b_nfe_max": max(self.b_nfe, default=0),
            "jac_steps": self.jac_steps,
            "eval_nfe": statistics.mean(eval_nfe) if eval_nfe else 0.0,
            "step_s": statistics.median(self.step_times),
            "eval_s": statistics.median(eval_times),
            "final_loss": statistics.mean(self.losses[-20:]),
        }


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train all necks in lockstep (same batch, one step each in turn) so that a shared, fluctuating CPU load
    affects them alike; then evaluate each."""
    data = ShapesDetectionDataModule(num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
                                     seed=args.seed)
    train, val = data.dataset("train"), data.dataset("val")
    runners = [Runner(neck, args) for neck in args.necks.split(",")]
    for r in runners[1:]:
        share_initial_weights(runners[0].net, r.net)
    order = torch.Generator().manual_seed(args.seed)
    perm: list[int] = []
    for step in range(args.steps):
        if len(perm) < args.batch_size:
            perm += torch.randperm(len(train), generator=order).tolist()
        images, targets = detection_collate([train[i] for i in perm[: args.batch_size]])
        del perm[: args.batch_size]
        for r in runners:
            r.train_step(images, targets)
        if (step + 1) % args.diag_every == 0 and step + 1 < args.steps:
            for r in runners:
                if getattr(r.net.backbone.fpn, "deq", None) is not None:
                    d = r.diagnose(images)
                    r.contraction_trace.append((step + 1, d["contraction"], d["gap"]))
        if (step + 1) % args.log_every == 0 or step == 0:
            print(f"step {step + 1}/{args.steps} " + "  ".join(
                f"{r.neck}: loss {statistics.mean(r.losses[-25:]):.3f} {1000 * statistics.median(r.step_times[-25:]):.0f} ms"
                + (f" nfe {r.f_nfe[-1]}/{r.b_nfe[-1]}" if r.f_nfe else "") for r in runners), flush=True)
    return {r.neck: r.evaluate(val, args.batch_size) for r in runners}


def vs_fpn(rows: dict[str, dict], neck: str, key: str) -> float:
    """``key`` (``step_s`` or ``eval_s``) of ``neck`` over the FPN's timed in the same process: a neck joined from
    another dump by ``--merge`` carries its ratio to that dump's FPN (times of two processes do not compare)."""
    return rows[neck].get(f"{key}_vs_fpn") or rows[neck][key] / rows["fpn"][key]


def table(rows: dict[str, dict[str, float]]) -> list[str]:
    base = rows.get("fpn")
    out = ["| neck | mAP | mAP@50 | mAP one application / equilibrium | contraction / gap (end) | neck params "
           "| total params | solver NFE fwd / bwd (train: mean, max) | NFE (eval) | s / train step | ms / image (eval) "
           "| final loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for neck, r in rows.items():
        ratio = f" ({vs_fpn(rows, neck, 'step_s'):.2f}x)" if base and neck != "fpn" else ""
        ratio_e = f" ({vs_fpn(rows, neck, 'eval_s'):.2f}x)" if base and neck != "fpn" else ""
        nfe = f"{r['f_nfe']:.1f} / {r['b_nfe']:.1f}" if r["f_nfe"] else "-"
        if r["f_nfe"] and "f_nfe_max" in r:
            nfe += f" (max {r['f_nfe_max']} / {r['b_nfe_max']})"
        one_eq = f"{r['map_one']:.3f} / {r['map_eq']:.3f}" if "map_one" in r else "-"
        diag = f"{r['contraction']:.2f} / {r['gap']:.2f}" if "contraction" in r else "-"
        out.append(f"| {neck} | {r['map']:.3f} | {r['map_50']:.3f} | {one_eq} | {diag} | {r['neck_params']:,} "
                   f"| {r['total_params']:,} | {nfe} | {r['eval_nfe']:.1f} | {r['step_s']:.3f}{ratio} "
                   f"| {1000 * r['eval_s']:.1f}{ratio_e} | {r['final_loss']:.3f} |")
    traces = {n: r["contraction_trace"] for n, r in rows.items() if r.get("contraction_trace")}
    if traces:
        out += ["", "Contraction estimate / one-application gap during training (training batch, eval-mode solve): "
                + "; ".join(f"`{n}` " + ", ".join(f"step {st}: {c:.2f} / {g:.2f}" for st, c, g in t)
                            for n, t in traces.items())]
    return out


GLANCE_NECKS = ("ifpn",)  # the shipped defaults feed the README glance
PREVIOUS = "ifpn_explicit"  # the explicit control: the same cell applied once, plain backprop


def _span(values: list[float], fmt: str, unit: str = "") -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt) + unit
    return f"{format(mean, fmt)}{unit} ({format(min(values), fmt)}{unit} to {format(max(values), fmt)}{unit})"


def _interval(diffs: list[float]) -> str:
    """The 95 % Student-t interval of paired per-seed differences as ``[lo, hi]``."""
    lo, hi = t_interval(diffs)
    return f"[{lo:+.3f}, {hi:+.3f}]"


def _paired(diffs: list[float]) -> str:
    """Mean (min to max) of paired per-seed differences, their 95 % interval and how many are above 0."""
    text = _span(diffs, "+.3f")
    if len(diffs) >= 2:
        text += f"; 95 % {_interval(diffs)}; > 0 in {sum(d > 0 for d in diffs)} of {len(diffs)}"
    return text


def _glance_spread(diffs: list[float]) -> str:
    text = f"{min(diffs):+.3f} to {max(diffs):+.3f} over {len(diffs)} seed(s)"
    return text + (f", paired 95 % {_interval(diffs)}" if len(diffs) >= 2 else "")


def summary(per_seed: dict[int, tuple[dict, float]], steps: int, num_val: int) -> list[str]:
    """Mean (min to max) over seeds of every neck's ratios and mAP; the mAP differences against the FPN, the explicit
    control and (for an i-FPN) the same trained cell applied once are paired by seed, with 95 % t-intervals."""
    seeds = sorted(per_seed)
    necks = list(dict.fromkeys(n for s in seeds for n in per_seed[s][0]))
    out = [f"## Summary over seeds {', '.join(map(str, seeds))}: mean (min to max)", "",
           f"| neck | mAP | mAP minus FPN | mAP minus {PREVIOUS} | mAP minus ifpn | equilibrium minus one application "
           "(same trained neck) | train step / FPN | eval time / FPN | NFE fwd / bwd (train) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for neck in necks:
        rows = [per_seed[s][0] for s in seeds if neck in per_seed[s][0]]
        cell = {
            "map": _span([r[neck]["map"] for r in rows], ".3f"),
            "fpn": _paired([r[neck]["map"] - r["fpn"]["map"] for r in rows if "fpn" in r]) if neck != "fpn" else "-",
            "prev": _paired([r[neck]["map"] - r[PREVIOUS]["map"] for r in rows if PREVIOUS in r])
            if neck not in (PREVIOUS, "fpn") and all(PREVIOUS in r for r in rows) else "-",
            "ifpn": _paired([r[neck]["map"] - r["ifpn"]["map"] for r in rows])
            if neck not in ("ifpn", "fpn", PREVIOUS) and all("ifpn" in r for r in rows) else "-",
            "eq": _paired([r[neck]["map_eq"] - r[neck]["map_one"] for r in rows])
            if "map_one" in rows[0][neck] else "-",
            "step": _span([vs_fpn(r, neck, "step_s") for r in rows if "fpn" in r], ".2f", "x")
            if neck != "fpn" else "1.00x",
            "eval": _span([vs_fpn(r, neck, "eval_s") for r in rows if "fpn" in r], ".2f", "x")
            if neck != "fpn" else "1.00x",
            "nfe": (f"{statistics.mean(r[neck]['f_nfe'] for r in rows):.1f} / "
                    f"{statistics.mean(r[neck]['b_nfe'] for r in rows):.1f}") if rows[0][neck]["f_nfe"] else "-",
        }
        out.append(f"| {neck} | {cell['map']} | {cell['fpn']} | {cell['prev']} | {cell['ifpn']} | {cell['eq']} "
                   f"| {cell['step']} | {cell['eval']} | {cell['nfe']} |")
    out += ["", f"mAP after {steps} steps on {num_val} held-out images. Differences are paired by seed (same data "
            "order, same initial weights for every shared module); one whose 95 % interval contains 0 is not a "
            "measured effect at this number of seeds. The ratios of step times are consistent from seed to seed."]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--steps", type=int, default=None, help="training steps per neck (default 1500, quick 20)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=None, help="validation images (default 200, quick 8)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0; with --merge, keep only these seeds of the dumps")
    parser.add_argument("--necks", default="fpn,ifpn,ifpn_explicit", help=f"comma-separated, from {sorted(NECK_KWARGS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared CPU)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--diag-every", type=int, default=250, help="contraction / gap of each i-FPN every N steps")
    parser.add_argument("--name", default="ifpn_shapes", help="results file stem")
    parser.add_argument("--raw", default=None, help="also dump the rows per seed as JSON here")
    parser.add_argument("--no-glance", action="store_true",
                        help="no rows for the README's glance table (side studies of the deciding run)")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="write the report from --raw dumps of runs with the same settings (seeds run in parallel)")
    args = parser.parse_args()
    if args.raw and Path(args.raw).resolve() == (RESULTS_DIR / f"{args.name}.json").resolve():
        parser.error(f"--raw {args.raw} is the results JSON that --name {args.name} writes; pick another path")
    unknown = sorted(set(args.necks.split(",")) - set(NECK_KWARGS))
    if unknown:
        parser.error(f"unknown neck(s) {unknown}; choose from {sorted(NECK_KWARGS)}")
    args.steps = args.steps or (20 if args.quick else 1500)
    args.num_val = args.num_val or (8 if args.quick else 200)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        "# FPN vs implicit FPN (i-FPN) on synthetic shapes", "", f"`{command}`", "",
        f"RetinaNet, ResNet-18 to layer3 (from scratch), 64 channels, {args.image_size}px shapes "
        f"({args.num_train:,} train, {args.num_val} held-out val), batch {args.batch_size}, {args.steps} AdamW steps "
        f"(one-cycle, peak lr {args.lr}, weight decay 1e-4, grad-norm clip 10), {args.threads} torch thread(s). "
        "All necks are trained in lockstep in one process (same batch, one step each in turn) from the same initial "
        "weights for every shared module (backbone, laterals, P6/P7, head); only ratios within a row are meaningful "
        "on this **2-core CPU shared with other jobs**. mAP = COCO mAP@[.5:.95] (torchmetrics, pycocotools "
        "thresholds). Necks: " + "; ".join(f"`{n}` = {NECKS[n][3]}" for n in args.necks.split(",")) + ".",
    ]
    ratios: dict[str, list[float]] = {}
    maps: dict[str, list[float]] = {}
    per_seed: dict[int, tuple[dict, float]] = {}
    if args.merge:
        for path in args.merge:
            for key, (rows, minutes) in json.loads(Path(path).read_text()).items():
                per_seed[int(key)] = combine(per_seed.get(int(key)), rows, minutes, int(key), path)
        missing = sorted(set(args.seeds or []) - set(per_seed))
        if missing:
            parser.error(f"--seeds {missing} are in none of the --merge dumps (they hold {sorted(per_seed)})")
        args.seeds = sorted(args.seeds or per_seed)
        per_seed = {seed: per_seed[seed] for seed in args.seeds}
        given = "".join(f" --{flag} {value}" for flag, value, default in (
            ("num-val", args.num_val, 200), ("diag-every", args.diag_every, 250), ("threads", args.threads, 1))
            if value != default)
        given += (" --no-glance" if args.no_glance else "") + (f" --name {args.name}" if args.name != "ifpn_shapes" else "")
        command = (f"python benchmarks/ifpn_shapes.py --steps {args.steps}{given} --necks {args.necks} --seeds "
                   f"{' '.join(map(str, args.seeds))}")
        lines[2] = (f"`{command}` (seeds run in one or more processes, each writing --raw, and merged with "
                    "--merge; a neck joined from another process's dump of the same seed is timed against that "
                    "process's FPN)")
    args.seeds = args.seeds or [0]
    for seed in args.seeds:
        if seed not in per_seed:
            args.seed = seed
            t0 = time.perf_counter()
            per_seed[seed] = (run(args), (time.perf_counter() - t0) / 60)
            if args.raw:
                Path(args.raw).write_text(json.dumps(per_seed))
        rows, minutes = per_seed[seed]
        lines += ["", f"## seed {seed} (wall time {minutes:.0f} min)", "", *table(rows)]
        print("\n".join(lines[-len(rows) - 2 :]), flush=True)
        for neck, r in rows.items():
            if neck != "fpn" and "fpn" in rows:
                ratios.setdefault(neck, []).append(vs_fpn(rows, neck, "step_s"))
                maps.setdefault(neck, []).append(r["map"] - rows["fpn"]["map"])
    lines += ["", *summary(per_seed, args.steps, args.num_val)]
    glance = []
    for neck in () if args.no_glance else GLANCE_NECKS:
        if neck not in ratios:
            continue
        values, gap = ratios[neck], maps[neck]
        glance += [
            {"family": "i-FPN", "what": f"{neck} train step / FPN train step (RetinaNet, shapes, CPU)",
             "value": f"{statistics.mean(values):.2f}x",
             "spread": f"{min(values):.2f}x-{max(values):.2f}x over {len(values)} seed(s)", "target": "<= 1.3x"},
            {"family": "i-FPN", "what": f"{neck} mAP minus FPN mAP ({args.steps} steps)",
             "value": f"{statistics.mean(gap):+.3f}", "spread": _glance_spread(gap), "target": ">= -0.01"},
        ]
        prev = [rows[neck]["map"] - rows[PREVIOUS]["map"] for rows, _ in per_seed.values()
                if neck in rows and PREVIOUS in rows]
        if prev and neck != PREVIOUS:
            glance.append({"family": "i-FPN", "what": f"{neck} mAP minus {PREVIOUS} mAP (the same cell applied "
                           f"once, {args.steps} steps)", "value": f"{statistics.mean(prev):+.3f}",
                           "spread": _glance_spread(prev),
                           "target": "> 0"})
    text = "\n".join(lines)
    print(text)
    write_results(args.name, text, command=command, glance=glance)
    add_to_json(RESULTS_DIR / f"{args.name}.json", per_seed, args.steps)


def combine(old: tuple[dict, float] | None, rows: dict, minutes: float, seed: int, path: str) -> tuple[dict, float]:
    """Join the necks of one seed from several dumps. A neck's run depends only on the seed (its initial weights
    and the data order do not depend on the other necks of the lockstep), so a neck in two dumps must agree exactly;
    a mismatch means different settings.

    Raises:
        SystemExit: when a neck's mAP differs between two dumps of the same seed.
    """
    if old is None:
        return rows, minutes
    for neck in set(old[0]) & set(rows):
        if old[0][neck]["map"] != rows[neck]["map"]:
            raise SystemExit(f"--merge {path}: seed {seed} neck {neck} scored {rows[neck]['map']} here and "
                             f"{old[0][neck]['map']} in an earlier dump; merge only runs made with the same settings")
    merged = dict(old[0])
    for neck, row in rows.items():
        if neck not in merged:
            merged[neck] = {**row, **{f"{k}_vs_fpn": vs_fpn(rows, neck, k) for k in ("step_s", "eval_s") if "fpn" in rows}}
    return merged, old[1] + minutes


def add_to_json(path: Path, per_seed: dict[int, tuple[dict, float]], steps: int) -> None:
    """Add the per-seed numbers a script checks (``steps``, ``seeds``, ``map`` per neck in seed order, and for each
    i-FPN the mAP of one application / of the equilibrium and the contraction / gap) to the results JSON."""
    seeds = sorted(per_seed)
    necks = list(dict.fromkeys(n for s in seeds for n in per_seed[s][0]))
    record = json.loads(path.read_text())
    record.update({"steps": steps, "seeds": seeds,
                   "map": {n: [per_seed[s][0][n]["map"] for s in seeds] for n in necks}})
    for key in ("map_one", "map_eq", "contraction", "gap", "step_s"):
        record[key] = {n: [per_seed[s][0][n][key] for s in seeds] for n in necks if key in per_seed[seeds[0]][0][n]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
