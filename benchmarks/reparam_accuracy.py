"""Does structural re-parameterization give "free accuracy"? The same deploy architecture trained four ways.

A plain VGG-style CNN (five 3x3 conv+BN+ReLU layers, 16-32-32-64-64 channels, strides 1-2-1-2-1, global pooling, a
linear classifier) is trained on Fashion-MNIST as is (``plain``), and with every conv+BN pair converted by
``convert_model`` into ACB, DBB or RepVGG blocks. After training each model is fused with ``reparameterize_model``:
all four deploy models have exactly the same architecture and cost. Equal epochs and optimizer for all; several
seeds; we report the mean and spread of test accuracy and check that the deploy model's accuracy equals the
training form's eval accuracy.

    python benchmarks/reparam_accuracy.py --quick              # CPU-sized: 2k-image subset, 3 epochs, 2k test images, 3 seeds
    python benchmarks/reparam_accuracy.py --device cuda        # full training set, 15 epochs, 3 seeds (GPU)

Writes a markdown table to stdout and, through ``results_io.write_results``, to ``benchmarks/results/<--name>.md`` and
``.json`` (default name ``reparam_accuracy``; the CPU run in the README used ``--quick --threads 2 --name
reparam_accuracy_cpu``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from results_io import write_results
from torch import nn

from lightning_nd.datamodules.fashion_mnist import _FILES, DEBIAN_DIR, _find, read_idx
from lightning_nd.reparam import convert_model, reparameterize_model

MEAN, STD = 0.2860, 0.3530
VARIANTS = ("plain", "acb", "dbb", "repvgg")


def plain_net(num_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    chs = 1
    for width, stride in ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
        layers += [nn.Conv2d(chs, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        chs = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chs, num_classes)]
    return nn.Sequential(*layers)


def build(variant: str) -> nn.Module:
    net = plain_net()
    return net if variant == "plain" else convert_model(net, variant)


def load(data_dir: str) -> dict[str, torch.Tensor]:
    folder = Path(data_dir)
    arrays = {}
    for key, stem in _FILES.items():
        path = _find(folder, stem)
        if path is None:
            raise FileNotFoundError(f"Fashion-MNIST file {stem} not found in {folder}")
        arrays[key] = read_idx(path)
    out = {}
    for split in ("train", "test"):
        x = torch.from_numpy(np.array(arrays[f"{split}_images"], dtype=np.float32)) / 255.0
        out[f"{split}_x"] = ((x - MEAN) / STD)[:, None]
        out[f"{split}_y"] = torch.from_numpy(np.array(arrays[f"{split}_labels"], dtype=np.int64))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, batch: int = 1000):
    model.eval()
    logits = torch.cat([model(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])
    return (logits.argmax(1) == y).float().mean().item(), logits


def train_one(variant: str, seed: int, data: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n = len(data["train_x"]) if args.train_subset is None else args.train_subset
    idx = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:n]  # same subset for all
    xs, ys = data["train_x"][idx], data["train_y"][idx]
    model = build(variant).to(args.device)
    steps = args.epochs * (n // args.batch_size)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(n // args.batch_size):
            b = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = xs[b], ys[b]
            flip = torch.rand(len(b), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x.to(args.device)), y.to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_time = time.perf_counter() - start
    acc_train_form, logits = evaluate(model, data["test_x"], data["test_y"], args.device)
    deploy = reparameterize_model(model.eval(), fold_bn=True) if variant != "plain" else model
    acc_deploy, logits_deploy = evaluate(deploy, data["test_x"], data["test_y"], args.device)
    rel = ((logits - logits_deploy).abs().max() / logits.abs().max()).item()
    return {
        "acc": acc_train_form, "acc_deploy": acc_deploy, "rel_err": rel, "time": train_time,
        "params_train": sum(p.numel() for p in model.parameters()),
        "params_deploy": sum(p.numel() for p in deploy.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 2k training images, 3 epochs, 2k test images")
    parser.add_argument("--data-dir", default=DEBIAN_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--train-subset", type=int)
    parser.add_argument("--test-subset", type=int, help="evaluate on the first N test images (default: all 10k)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--name", default="reparam_accuracy", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.epochs = args.epochs or 3
        args.train_subset = args.train_subset or 2_000
        args.test_subset = args.test_subset or 2_000
    if args.threads:
        torch.set_num_threads(args.threads)
    args.epochs = args.epochs or 15
    data = load(args.data_dir)
    if args.test_subset:
        data["test_x"], data["test_y"] = data["test_x"][: args.test_subset], data["test_y"][: args.test_subset]
    variants = args.variants.split(",")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    started = time.perf_counter()
    for seed in range(args.seeds):
        for variant in variants:
            r = train_one(variant, seed, data, args)
            results[variant].append(r)
            print(f"seed {seed} {variant:7s} acc {r['acc']:.4f} deploy {r['acc_deploy']:.4f} rel.err {r['rel_err']:.1e} "
                  f"{r['time']:.0f}s", flush=True)
    total = time.perf_counter() - started
    n = args.train_subset or len(data["train_x"])
    lines = [
        "# Fashion-MNIST: the same deploy CNN trained plain / ACB / DBB / RepVGG-style",
        "",
        f"Settings: {n} training images, {args.epochs} epochs, batch {args.batch_size}, SGD(nesterov, lr {args.lr}, "
        f"cosine, wd {args.weight_decay} on weights), random flips, {args.seeds} seeds (0..{args.seeds - 1}); test on "
        f"the first {len(data['test_x'])} test images; device {args.device}, torch threads {torch.get_num_threads()}; total {total / 60:.1f} min.",
        "",
        "| variant | test acc mean | std | min | max | deploy acc == train-form acc | max rel. logit error | params "
        "train -> deploy | train time/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        accs = [r["acc"] for r in results[v]]
        same = all(r["acc"] == r["acc_deploy"] for r in results[v])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {v} | {100 * statistics.mean(accs):.2f} | {100 * std:.2f} | {100 * min(accs):.2f} | {100 * max(accs):.2f} "
            f"| {'yes' if same else 'NO'} | {max(r['rel_err'] for r in results[v]):.1e} | "
            f"{results[v][0]['params_train']:,} -> {results[v][0]['params_deploy']:,} | "
            f"{statistics.mean(r['time'] for r in results[v]):.0f} s |"
        )
    lines += ["", "Per run (test acc %): " + "; ".join(
        f"{v}: " + ", ".join(f"{100 * r['acc']:.2f}" for r in results[v]) for v in variants)]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.name, text, command="python " + " ".join(sys.argv), glance=glance_rows(results, variants, n, args))


def glance_rows(results: dict, variants: list[str], n: int, args: argparse.Namespace) -> list[dict[str, str]]:
    """One README row per variant: mean test accuracy, spread over seeds."""
    rows = []
    for v in variants:
        accs = [100 * r["acc"] for r in results[v]]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append({"family": "Re-param", "what": f"Fashion-MNIST CNN test acc., {v} ({n} images, {args.epochs} epochs; "
                     "deploy acc == train-form acc)", "value": f"{statistics.mean(accs):.2f} %",
                     "spread": f"std {std:.2f}, {min(accs):.2f}-{max(accs):.2f} over {len(accs)} seeds",
                     "target": "> plain" if v != "plain" else "baseline"})
    return rows


if __name__ == "__main__":
    main()
