"""MDEQ-tiny against a ResNet of the same parameter count on Fashion-MNIST: accuracy, time per step, solver work.

Both networks (stride-2 stem, 14x14 and 7x7 features, ~24k parameters) are trained **in lockstep in one process**:
every step feeds the same batch to each model in turn and times each, so the fluctuating load of a shared machine
hits both alike and the reported ratios come from interleaved timings. Adam 2e-3 with cosine decay, batch 64, the
same seeded subset, order and epoch budget for both; accuracy on the official 10,000-image test set after every
epoch (inference timed per batch, interleaved as well). The MDEQ follows a *recipe* (``RECIPES``): its solver,
tolerances and caps, backward mode, unrolled warm-up, Jacobian-regularisation schedule and MDEQ-tiny's widths
(``CONFIG_RECIPE`` = ``wide_b4`` is the one of ``configs/implicit/mdeq_tiny_fashion.yaml``, ``fast`` the first one of
issue 15 with the original 8 / 16-channel cell, ``baseline`` the one before issue 15; the others are ablations). The
first epoch holds the unrolled warm-up; the step time reported is the median over the steps after it (the same steps
for every model). At the end the final models are evaluated with other test-time forward caps (accuracy against
inference cost), on held-out training images (``--sweep-subset`` images not in the training subset) and on the test
images; a cheaper cap is chosen on the held-out images only (``VAL_TOLERANCE``) and reported on the test images.

    python benchmarks/deq_fashion.py --quick                     # smoke run (1,000 images, 1 epoch, 1 seed)
    python benchmarks/deq_fashion.py --train-subset 20000 --epochs 12 --seeds 0 1 2 --recipes wide wide_b4
    # the same, one process per seed, then one report:
    #   ... --seeds 0 --raw /tmp/s0.json (and 1, 2), then ... --merge /tmp/s0.json /tmp/s1.json /tmp/s2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS_DIR, write_results

from lightning_nd.datamodules.fashion_mnist import DEBIAN_DIR, read_idx
from lightning_nd.implicit import MDEQ, JacobianSchedule

MDEQ_TINY: dict[str, Any] = {
    "channels": [8, 16],
    "head_channels": [4, 8],
    "final_channels": 64,
    "expansion": 2,
    "groups": 4,
    "dropout": 0.1,
    "downsample": 1,
}

RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {
        "deq": {"f_solver": "anderson", "f_max_iter": 12, "f_tol": 1e-2, "f_stop_mode": "rel",
                "b_solver": "anderson", "b_max_iter": 12, "b_tol": 1e-2, "b_stop_mode": "rel"},
        "warmup_steps": 100, "unroll_layers": 4, "jac": None, "model": {},
        "note": "before issue 15: Anderson 12 / 12 at rel 1e-2, exact implicit gradient, 100 unrolled warm-up "
                "steps, no Jacobian regularisation.",
    },
}


NO_JAC = JacobianSchedule()  # weight 0: a recipe without Jacobian regularisation


def add_recipe(name: str, note: str, base: str = "baseline", jac: JacobianSchedule | None = None,
               model: dict[str, Any] | None = None, **deq: Any) -> None:
    """A recipe: ``base``'s, with other DEQ options (``deq``), schedule (``jac``) or MDEQ-tiny arguments (``model``)."""
    recipe = dict(RECIPES[base])
    recipe["deq"] = {**RECIPES[base]["deq"], **deq}
    recipe["jac"] = jac if jac is not None else RECIPES[base]["jac"]
    recipe["model"] = {**RECIPES[base]["model"], **(model or {})}
    recipe["note"] = note
    RECIPES[name] = recipe


JAC = JacobianSchedule(weight=2.0, prob=0.25, cap_jitter=2, seed=0)
add_recipe("jr", "baseline + Jacobian regularisation (weight 2.0, probability 0.25, forward-cap jitter -2..+1).",
           jac=JAC)
add_recipe("fast", "Jacobian regularisation (weight 2.0, p 0.25, cap jitter -2..+1), Anderson forward 6 at rel "
           "2e-2 (test-time cap 6), Anderson adjoint 5 at rel 2e-2, exact implicit gradient.",
           jac=JAC, f_max_iter=6, f_tol=2e-2, eval_f_max_iter=6, b_max_iter=5, b_tol=2e-2)
add_recipe("phantom", "the fast recipe with a 2-step phantom gradient (tau 0.7) instead of the adjoint solve.",
           base="fast", backward="phantom", phantom_steps=2, phantom_tau=0.7)
# ablations of the fast recipe (accuracy per epoch; benchmarks/results/deq_fashion_ablation_*.md)
add_recipe("fast_nodrop", "the fast recipe without variational dropout.", base="fast", model={"dropout": 0.0})
add_recipe("fast_nojr", "the fast recipe without Jacobian regularisation.", base="fast", jac=NO_JAC)
add_recipe("fast_nodrop_nojr", "the fast recipe without dropout and without Jacobian regularisation.",
           base="fast_nodrop", jac=NO_JAC)
LIGHT_JAC = JacobianSchedule(weight=0.4, prob=0.1, cap_jitter=2, seed=0)
add_recipe("fast_lightjr", "the fast recipe with weaker Jacobian regularisation (weight 0.4, p 0.1, jitter -2..+1).",
           base="fast", jac=LIGHT_JAC)
add_recipe("fast_nodrop_lightjr", "the fast recipe without dropout, with the weaker Jacobian regularisation.",
           base="fast_nodrop", jac=LIGHT_JAC)
add_recipe("wide12", "fast_nodrop_lightjr with channels 12 / 24, expansion 1, head 4 / 4, final 48 (23,458 "
           "parameters).", base="fast_nodrop_lightjr",
           model={"channels": [12, 24], "expansion": 1, "head_channels": [4, 4], "final_channels": 48})
# since the ablations: same solver caps as `fast`, a wider cell with expansion 1 at the same parameter count, no
# dropout, lighter Jacobian regularisation
add_recipe("wide", "MDEQ-tiny with a wider cell at the same size (channels 16 / 16, expansion 1, head 4 / 8, final "
           "48: 23,978 parameters), no dropout, Jacobian regularisation weight 0.4 on 10 % of the steps (cap jitter "
           "-2..+1), Anderson forward 6 / adjoint 5 at rel 2e-2 (test-time cap 6), exact implicit gradient.",
           base="fast_nodrop_lightjr", model={"channels": [16, 16], "expansion": 1, "final_channels": 48})
# the recipe of configs/implicit/mdeq_tiny_fashion.yaml: `wide` with one adjoint evaluation fewer (12 epochs, 3 seeds:
# 0.1 points lower on average, within the seed spread, for a 6-7 % cheaper training step)
add_recipe("wide_b4", "the wide recipe with the adjoint (backward) solve capped at 4 evaluations instead of 5.",
           base="wide", b_max_iter=4)
CONFIG_RECIPE = "wide_b4"
# issue 22 candidate: a tiny DEQ trained with Jacobian regularisation on every step reaches its tolerance within the
# training cap and keeps its accuracy at larger test-time caps (tests/implicit/test_equilibrium_caps.py)
add_recipe("wide_b4_jr", "the wide_b4 recipe with Jacobian regularisation (weight 0.4) on every step instead of 10 %.",
           base="wide_b4", jac=JacobianSchedule(weight=0.4, prob=1.0, cap_jitter=2, seed=0))
add_recipe("wide_b4_jr2", "the wide_b4 recipe with the JR paper's regularisation strength (weight 2.0 on 25 % of the "
           "steps, cap jitter -2..+1) instead of weight 0.4 on 10 %.", base="wide_b4", jac=JAC)
add_recipe("wide_b4_jr2_p50", "wide_b4_jr2 with the regularisation on 50 % of the steps.", base="wide_b4",
           jac=JacobianSchedule(weight=2.0, prob=0.5, cap_jitter=2, seed=0))
add_recipe("wide_b4_f12", "the wide_b4 recipe with forward cap 12 in training and at test time (training solves "
           "that reach the tolerance).", base="wide_b4", f_max_iter=12, eval_f_max_iter=12)
add_recipe("wide_b4_jr_f12", "wide_b4_jr (regularisation weight 0.4 on every step) with forward cap 12 in training "
           "and at test time.", base="wide_b4_jr", f_max_iter=12, eval_f_max_iter=12)
# the equilibrium recipe at the config's cost: the adjoint solve (4 vector-Jacobian products) replaced by a 2-step
# phantom gradient (Geng et al. 2021; damping 0.7 as torchdeq suggests for MDEQ) pays for the longer forward solve
add_recipe("wide_b4_f12_ph2", "wide_b4_f12 with a 2-step phantom gradient (tau 0.7) instead of the adjoint solve.",
           base="wide_b4_f12", backward="phantom", phantom_steps=2, phantom_tau=0.7)
add_recipe("wide_b4_f16_ph2", "wide_b4_f12_ph2 with forward cap 16 in training and at test time.",
           base="wide_b4_f12_ph2", f_max_iter=16, eval_f_max_iter=16)


EVAL_CAPS = (3, 4, 5, 6, 8, 12, 16)  # forward caps at test time swept on the final models (issue 22: up to 16)
# A cheaper test-time cap is chosen without the test set: per seed, the smallest swept cap whose accuracy on held-out
# training images (not in the training subset) is within this many points of the recipe's own cap
VAL_TOLERANCE = 0.25
FASHION_TRAIN_SIZE = 60000


def build_mdeq(recipe: dict[str, Any]) -> MDEQ:
    return MDEQ(num_classes=10, in_chans=1, **{**MDEQ_TINY, **recipe["model"]},
                deq={**recipe["deq"], "unroll_layers": recipe["unroll_layers"]})


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.sc = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.sc(x))


class SmallResNet(nn.Module):
    """stride-2 stem -> BasicBlock(w) at 14x14 -> BasicBlock(2w, stride 2) at 7x7 -> pool -> linear."""

    def __init__(self, width: int = 18, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_Basic(width, width, 1), _Basic(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def load_fashion(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 1, 28, 28) and labels of the official train or test split (Debian package files)."""
    prefix = "train" if split == "train" else "t10k"
    folder = Path(DEBIAN_DIR)
    images = read_idx(next(folder.glob(f"{prefix}-images-idx3-ubyte*")))
    labels = read_idx(next(folder.glob(f"{prefix}-labels-idx1-ubyte*")))
    x = (torch.from_numpy(images.copy()).float() / 255.0 - 0.2860) / 0.3530
    return x[:, None], torch.from_numpy(labels.copy()).long()


def fashion_batches(batch_size: int, steps: int, seed: int = 0):
    """``steps`` random training batches (used by deq_profile.py)."""
    x, y = load_fashion("train")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (batch_size,), generator=gen)
        yield x[idx], y[idx]


class Trainee:
    """One model in the lockstep run: its optimizer, schedule, and per-step measurements."""

    def __init__(self, name: str, net: nn.Module, recipe: dict[str, Any] | None, total_steps: int) -> None:
        self.name, self.net, self.recipe = name, net, recipe
        self.opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total_steps)
        self.step = 0
        self.step_s: list[float] = []
        self.warm: list[bool] = []  # per step: an unrolled warm-up step
        self.nfe: list[tuple[int, int]] = []
        self.epochs: list[dict[str, float]] = []

    @property
    def deq(self):
        return getattr(self.net, "deq", None)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.net.train()
        weight, deq = 0.0, self.deq
        t0 = time.perf_counter()
        if deq is not None:  # what DEQWarmup and DEQClassifier do in a Lightning run
            warm = self.step < self.recipe["warmup_steps"]
            deq.mode = "unrolled" if warm else "equilibrium"
            jac: JacobianSchedule | None = self.recipe["jac"]
            active = jac is not None and jac.active(self.step, 0, warm)
            deq.jac_reg = active
            if active:
                weight = jac.weight_at(self.step, warm)
                deq.f_max_iter_delta = jac.cap_delta(self.step, 0, warm)
        loss = F.cross_entropy(self.net(images), labels)
        if weight and deq.jac_loss is not None:
            loss = loss + weight * deq.jac_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step_s.append(time.perf_counter() - t0)
        self.warm.append(deq is not None and deq.mode == "unrolled")
        if deq is not None:
            deq.jac_reg, deq.f_max_iter_delta = False, 0
            st = deq.last_stats
            if st.mode == "equilibrium":
                self.nfe.append((st.forward.nfe, st.backward.nfe if st.backward is not None else 0))
        self.step += 1

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float, float, float]:
        """Test accuracy, median seconds per inference batch, mean forward evaluations, and the share of samples
        whose forward solve reached its tolerance (issue 22's target; 1.0 for the ResNet)."""
        self.net.eval()
        if self.deq is not None:
            self.deq.mode = "equilibrium"
        correct, times, nfe, reached = 0, [], [], 0
        for lo in range(0, len(y), batch_size):
            t0 = time.perf_counter()
            logits = self.net(x[lo : lo + batch_size])
            times.append(time.perf_counter() - t0)
            correct += int((logits.argmax(1) == y[lo : lo + batch_size]).sum())
            if self.deq is not None:
                nfe.append(self.deq.last_stats.forward.nfe)
                reached += int(self.deq.last_stats.forward.converged.sum())
        share = reached / len(y) if self.deq is not None else 1.0
        return correct / len(y), statistics.median(times), statistics.mean(nfe) if nfe else 0.0, share


def run_seed(seed: int, recipes: list[str], args: argparse.Namespace, train, test) -> dict[str, list[dict]]:
    x_train, y_train = train
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y_train), generator=gen)
    subset = perm[: args.train_subset]
    held_out = perm[args.train_subset : args.train_subset + args.sweep_subset]  # validation for the cap sweep
    steps_per_epoch = len(subset) // args.batch_size
    total = steps_per_epoch * args.epochs
    trainees = []
    torch.manual_seed(seed)
    trainees.append(Trainee("ResNet", SmallResNet(), None, total))
    for name in recipes:
        torch.manual_seed(seed)
        trainees.append(Trainee(f"MDEQ-tiny ({name})", build_mdeq(RECIPES[name]), RECIPES[name], total))
    for epoch in range(args.epochs):
        order = subset[torch.randperm(len(subset), generator=gen)]
        t_epoch = {t.name: len(t.step_s) for t in trainees}
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            images, labels = x_train[idx], y_train[idx]
            for t in trainees:
                t.train_step(images, labels)
            if (i + 1) % 50 == 0:
                print(f"seed {seed} epoch {epoch + 1} step {i + 1}/{steps_per_epoch}: " + ", ".join(
                    f"{t.name} {1000 * statistics.median(t.step_s[-50:]):.0f} ms"
                    + (f" nfe {t.nfe[-1][0]}/{t.nfe[-1][1]}" if t.nfe else "") for t in trainees), flush=True)
        x_test, y_test = test
        # the steps of this epoch where no MDEQ was in its unrolled warm-up: every model's step time (the ResNet's
        # too) is the median over the same steps, so the ratios compare steps taken side by side
        first = t_epoch[trainees[0].name]
        solving = [not any(t.warm[k] for t in trainees) for k in range(first, first + steps_per_epoch)]
        for t in trainees:
            acc, infer_s, eval_nfe, _ = t.evaluate(x_test[: args.test_subset], y_test[: args.test_subset], 250)
            steps = t.step_s[t_epoch[t.name] :]
            solved = [dt for dt, keep in zip(steps, solving) if keep] or steps
            nfe = t.nfe[-steps_per_epoch:]
            t.epochs.append({
                "epoch": epoch + 1, "acc": acc, "epoch_train_s": sum(steps),
                "step_ms": 1000 * statistics.median(solved),  # median over the epoch's steps after the warm-up
                "infer_ms": 1000 * infer_s, "eval_nfe": eval_nfe,
                "f_nfe": statistics.mean(f for f, _ in nfe) if nfe else 0.0,
                "b_nfe": statistics.mean(b for _, b in nfe) if nfe else 0.0,
                "params": sum(p.numel() for p in t.net.parameters()),
            })
            print(f"seed {seed} epoch {epoch + 1} {t.name}: acc {100 * acc:.2f} % step {t.epochs[-1]['step_ms']:.0f} ms "
                  f"infer {t.epochs[-1]['infer_ms']:.0f} ms / 250 nfe {t.epochs[-1]['f_nfe']:.1f}/"
                  f"{t.epochs[-1]['b_nfe']:.1f} eval nfe {eval_nfe:.1f}", flush=True)
    # accuracy against the inference budget of the final models: the forward cap at test time, swept on held-out
    # training images (for choosing a cap) and on the test images (for reporting it)
    x_val, y_val = x_train[held_out], y_train[held_out]
    x_test, y_test = x_test[: args.test_subset], y_test[: args.test_subset]
    for t in trainees:
        if t.deq is None:
            continue
        original, t.sweep = t.deq.config.eval_f_max_iter, []
        for cap in EVAL_CAPS:
            t.deq.config.eval_f_max_iter = cap
            val_acc, _, _, _ = t.evaluate(x_val, y_val, 250)
            acc, infer_s, nfe, reached = t.evaluate(x_test, y_test, 250)
            _, ref_s, _, _ = trainees[0].evaluate(x_test, y_test, 250)
            t.sweep.append({"cap": cap, "val_acc": val_acc, "acc": acc, "infer_ratio": infer_s / ref_s, "nfe": nfe,
                            "reached": reached})
        t.deq.config.eval_f_max_iter = original
        t.epochs[-1]["sweep"] = t.sweep
        t.epochs[-1]["chosen_cap"] = choose_cap(t.sweep, original)
    return {t.name: t.epochs for t in trainees}


def choose_cap(sweep: list[dict], own_cap: int) -> int:
    """The smallest swept cap whose held-out accuracy is within ``VAL_TOLERANCE`` points of ``own_cap``'s."""
    reference = next(row["val_acc"] for row in sweep if row["cap"] == own_cap)
    return min(row["cap"] for row in sweep if 100 * (reference - row["val_acc"]) <= VAL_TOLERANCE)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(results: dict[int, dict[str, list[dict]]], args: argparse.Namespace, command: str) -> tuple[str, list]:
    seeds = sorted(results)
    names = list(results[seeds[0]])
    base = "ResNet"
    lines = [
        "# MDEQ-tiny vs ResNet on Fashion-MNIST",
        "",
        f"`{command}`",
        "",
        f"Fashion-MNIST, {args.train_subset:,} training images (seeded subset), {args.epochs} epochs, batch "
        f"{args.batch_size}, Adam 2e-3 with cosine decay, seeds {seeds}; accuracy on {args.test_subset:,} official "
        f"test images. All models trained in lockstep in one process (interleaved timing, {args.threads} torch "
        "thread(s)) on a **2-core CPU shared with other jobs**: absolute times are noisy, the ratios to the ResNet timed in the same "
        "run are the result. Values are mean (min-max) over seeds.",
        "",
        "Recipes: " + "; ".join(f"`{n}`: {RECIPES[n]['note']}" for n in args.recipes),
        "",
        "## Final epoch",
        "",
        "Train step: median over the epoch's steps after the MDEQ's unrolled warm-up (the same steps for every "
        "model, the ResNet's included).",
        "",
        "| model | params | test acc % | train step ms | x ResNet | inference ms / 250 | x ResNet "
        "| solver evals fwd / bwd (train) | fwd evals (test) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    glance = []
    for name in names:
        last = [results[s][name][-1] for s in seeds]
        ref = [results[s][base][-1] for s in seeds]
        ratio_step = [r["step_ms"] / b["step_ms"] for r, b in zip(last, ref)]
        ratio_inf = [r["infer_ms"] / b["infer_ms"] for r, b in zip(last, ref)]
        acc = [100 * r["acc"] for r in last]
        lines.append(
            f"| {name} | {last[0]['params']:,} | {spread(acc)} | {spread([r['step_ms'] for r in last], '{:.0f}')} "
            f"| {spread(ratio_step)} | {spread([r['infer_ms'] for r in last], '{:.0f}')} | {spread(ratio_inf)} "
            f"| {spread([r['f_nfe'] for r in last], '{:.1f}')} / {spread([r['b_nfe'] for r in last], '{:.1f}')} "
            f"| {spread([r['eval_nfe'] for r in last], '{:.1f}')} |"
        )
        if name != base:
            gap = [a - 100 * b["acc"] for a, b in zip(acc, ref)]
            glance += [
                {"family": "DEQ", "what": f"{name}: train step / ResNet step (Fashion-MNIST, batch 64, CPU)",
                 "value": f"{statistics.mean(ratio_step):.2f}x", "spread": f"{min(ratio_step):.2f}x-"
                 f"{max(ratio_step):.2f}x over {len(seeds)} seeds", "target": "<= 4x"},
                {"family": "DEQ", "what": f"{name}: inference / ResNet inference",
                 "value": f"{statistics.mean(ratio_inf):.2f}x", "spread": f"{min(ratio_inf):.2f}x-"
                 f"{max(ratio_inf):.2f}x over {len(seeds)} seeds", "target": "<= 5x"},
                {"family": "DEQ", "what": f"{name}: test accuracy minus ResNet's ({args.epochs} epochs, "
                 f"{args.train_subset:,} images)", "value": f"{statistics.mean(gap):+.2f} points",
                 "spread": f"{min(gap):+.2f} to {max(gap):+.2f} over {len(seeds)} seeds", "target": ">= -0.5"},
            ]
    lines += ["", "## Per epoch (time to accuracy)", "",
              "Epoch 1 holds the MDEQ's unrolled warm-up steps. Cumulative training seconds (sum of the timed "
              "steps) and test accuracy after each epoch, mean over seeds.", "",
              "| model | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |",
              "|---|" + "---|" * args.epochs]
    for name in names:
        cells = []
        for e in range(args.epochs):
            cum = statistics.mean(sum(r["epoch_train_s"] for r in results[s][name][: e + 1]) for s in seeds)
            acc = statistics.mean(100 * results[s][name][e]["acc"] for s in seeds)
            cells.append(f"{cum:.0f} s, {acc:.2f} %")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    swept = next((results[s][n][-1]["sweep"] for s in seeds for n in names if "sweep" in results[s][n][-1]), [])
    caps = [row["cap"] for row in swept]  # from the data: older raw dumps swept other caps
    with_val = bool(swept) and "val_acc" in swept[0]
    lines += ["", "## Accuracy against the test-time forward cap (final models)", "",
              "The same trained models evaluated with other forward caps (`eval_f_max_iter`): accuracy on "
              + (f"{args.sweep_subset:,} held-out training images (not in the training subset) / on the "
                 f"{args.test_subset:,} test images" if with_val else f"{args.sweep_subset:,} test images")
              + "; inference time as a ratio to the ResNet's, timed alternately in the same run. Mean over seeds.", "",
              "| model | " + " | ".join(f"cap {c}" for c in caps) + " |", "|---|" + "---|" * len(caps)]
    for name in names:
        sweeps = [results[s][name][-1].get("sweep") for s in seeds]
        if not all(sweeps):
            continue
        cells = []
        for i, _ in enumerate(caps):
            acc = statistics.mean(100 * sw[i]["acc"] for sw in sweeps)
            ratio = statistics.mean(sw[i]["infer_ratio"] for sw in sweeps)
            val = f"{statistics.mean(100 * sw[i]['val_acc'] for sw in sweeps):.2f} / " if with_val else ""
            reached = (f" ({statistics.mean(100 * sw[i]['reached'] for sw in sweeps):.0f} % reach tol)"
                       if "reached" in sweeps[0][i] else "")
            cells.append(f"{val}{acc:.2f} %{reached} at {ratio:.1f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in names:
        finals = [results[s][name][-1] for s in seeds]
        if not all("chosen_cap" in r for r in finals):
            continue
        rows = [next(row for row in r["sweep"] if row["cap"] == r["chosen_cap"]) for r in finals]
        gap = [100 * (row["acc"] - results[s][base][-1]["acc"]) for row, s in zip(rows, seeds)]
        ratio = [row["infer_ratio"] for row in rows]
        chosen = ", ".join(str(r["chosen_cap"]) for r in finals)
        lines += ["", f"Cap chosen on the held-out images ({name}; per seed the smallest cap within {VAL_TOLERANCE} "
                  f"points of the recipe's own): caps {chosen}; test accuracy minus the ResNet's "
                  f"{statistics.mean(gap):+.2f} points ({min(gap):+.2f} to {max(gap):+.2f}), inference "
                  f"{spread(ratio)}x the ResNet's."]
    return "\n".join(lines), glance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 training images, 1 epoch, 1,000 test images")
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-subset", type=int, default=10000)
    parser.add_argument("--sweep-subset", type=int, default=5000,
                        help="held-out training images (not in --train-subset) for choosing a test-time cap")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=[CONFIG_RECIPE], choices=sorted(RECIPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="deq_fashion", help="results file stem")
    parser.add_argument("--no-glance", action="store_true",
                        help="keep this run out of the README's results-at-a-glance table (ablations)")
    parser.add_argument("--raw", default=None, help="also dump the per-epoch rows as JSON here")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="write the report from --raw dumps of runs with the same settings (seeds run in parallel)")
    args = parser.parse_args()
    if args.raw and Path(args.raw).resolve() == (RESULTS_DIR / f"{args.name}.json").resolve():
        parser.error(f"--raw {args.raw} is the results JSON that --name {args.name} writes; pick another path")
    if args.quick:
        args.train_subset, args.epochs, args.test_subset, args.seeds = 1000, 1, 1000, args.seeds[:1]
        args.sweep_subset = 500
    if args.train_subset + args.sweep_subset > FASHION_TRAIN_SIZE:
        parser.error(f"--train-subset {args.train_subset} + --sweep-subset {args.sweep_subset} held-out images exceed "
                     f"the {FASHION_TRAIN_SIZE:,} Fashion-MNIST training images")
    torch.set_num_threads(args.threads)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    if args.merge:
        results = {}
        for path in args.merge:
            results.update({int(k): v for k, v in json.loads(Path(path).read_text()).items()})
        args.seeds = sorted(results)
        subsets = "".join(f" --{flag} {value}" for flag, value, default in (
            ("test-subset", args.test_subset, 10000), ("sweep-subset", args.sweep_subset, 5000),
            ("threads", args.threads, 1)) if value != default)
        command = (f"python benchmarks/deq_fashion.py --train-subset {args.train_subset} --epochs {args.epochs}"
                   f"{subsets} --seeds {' '.join(map(str, args.seeds))} --recipes {' '.join(args.recipes)} (seeds "
                   "run as parallel processes, merged with --raw/--merge)")
    else:
        train, test = load_fashion("train"), load_fashion("test")
        results = {seed: run_seed(seed, args.recipes, args, train, test) for seed in args.seeds}
    if args.raw:
        Path(args.raw).write_text(json.dumps(results, indent=1))
    text, glance = report(results, args, command)
    picture = plot_time_to_accuracy(results, RESULTS_DIR / args.name)
    if picture is not None:
        text += f"\n\n![time to accuracy]({picture.name})\n"
    print(text)
    write_results(args.name, text, command=command, glance=[] if args.no_glance else glance)
    add_cap_sweep(RESULTS_DIR / f"{args.name}.json", results)


def add_cap_sweep(path: Path, results: dict[int, dict[str, list[dict]]]) -> None:
    """Add the test-time cap sweep to the results JSON (issue 22): ``config_cap`` (the test-time cap of the config
    recipe), ``cap_sweep`` = {seed: {cap: test accuracy %}} for the config recipe (or the first DEQ recipe run), and
    ``cap_sweep_by_recipe`` = {recipe: {seed: {cap: test accuracy %}}} for every DEQ recipe and
    ``cap_reached_by_recipe`` (the same layout: % of test samples whose forward solve reached the tolerance)."""
    by_recipe: dict[str, dict[str, dict[str, float]]] = {}
    reached: dict[str, dict[str, dict[str, float]]] = {}
    for seed, models in sorted(results.items()):
        for name, epochs in models.items():
            if "sweep" in epochs[-1]:
                by_recipe.setdefault(name, {})[str(seed)] = {str(row["cap"]): round(100 * row["acc"], 2)
                                                             for row in epochs[-1]["sweep"]}
                if "reached" in epochs[-1]["sweep"][0]:
                    reached.setdefault(name, {})[str(seed)] = {str(row["cap"]): round(100 * row["reached"], 1)
                                                               for row in epochs[-1]["sweep"]}
    if not by_recipe:
        return
    main = next((n for n in by_recipe if CONFIG_RECIPE in n), next(iter(by_recipe)))
    record = json.loads(path.read_text())
    deq = RECIPES[CONFIG_RECIPE]["deq"]
    config_cap = deq.get("eval_f_max_iter") or deq.get("f_max_iter")
    record.update({"config_cap": config_cap, "cap_sweep_recipe": main,
                   "cap_sweep": by_recipe[main], "cap_sweep_by_recipe": by_recipe,
                   "cap_reached_by_recipe": reached})  # % of test samples whose solve reached the tolerance
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def plot_time_to_accuracy(results: dict[int, dict[str, list[dict]]], stem: Path) -> Path | None:
    """Test accuracy against cumulative training seconds, one line per model and seed (``<stem>.png``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional for the benchmark
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(next(iter(results.values())))
    for color, name in zip(("black", "tab:blue", "tab:orange", "tab:green", "tab:red"), names):
        for k, seed in enumerate(sorted(results)):
            rows = results[seed][name]
            xs, total = [], 0.0
            for r in rows:
                total += r["epoch_train_s"]
                xs.append(total)
            ax.plot(xs, [100 * r["acc"] for r in rows], "o-", color=color, alpha=0.8, label=name if k == 0 else None)
    ax.set_xlabel("cumulative training time (s, shared 2-core CPU)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: time to accuracy (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = stem.with_suffix(".png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
