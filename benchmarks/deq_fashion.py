"""MDEQ-tiny against a ResNet of similar parameter count on Fashion-MNIST: accuracy, parameters, time per epoch.

Both networks use a stride-2 stem (14x14 features), Adam (lr 2e-3), batch 64, the same training subset and epochs;
the MDEQ runs the configuration of ``configs/implicit/mdeq_tiny_fashion.yaml`` (Anderson, rel tol 1e-2, 12 forward
and 12 backward steps, exact implicit gradient, 100 unrolled warm-up steps). Accuracy is measured on the official
10,000-image test set (``--test-subset`` to shorten). Results go to a markdown table.

    python benchmarks/deq_fashion.py [--quick] [--train-subset 6000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_nd.callbacks import DEQMonitor, DEQWarmup
from lightning_nd.datamodules import FashionMNISTDataModule
from lightning_nd.modules import DEQClassifier, ImageClassifier

MDEQ_TINY = {
    "channels": [8, 16],
    "head_channels": [4, 8],
    "final_channels": 64,
    "expansion": 2,
    "groups": 4,
    "dropout": 0.1,
    "downsample": 1,
    "deq": {
        "f_solver": "anderson", "f_max_iter": 12, "f_tol": 1e-2, "f_stop_mode": "rel",
        "b_solver": "anderson", "b_max_iter": 12, "b_tol": 1e-2, "b_stop_mode": "rel",
    },
}


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


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t)


def run(name: str, module: pl.LightningModule, callbacks: list, args: argparse.Namespace) -> dict:
    pl.seed_everything(0)
    data = FashionMNISTDataModule(batch_size=64, train_subset=args.train_subset, val_size=5000, eval_batch_size=250)
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer, *callbacks],
        limit_test_batches=args.test_subset // 250 if args.test_subset else 1.0,
    )
    trainer.fit(module, datamodule=data)
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    row = {
        "model": name,
        "params": sum(p.numel() for p in module.parameters()),
        "epoch_s": sum(timer.times) / len(timer.times),
        "acc": metrics["test/acc"],
    }
    deq = getattr(getattr(module, "net", None), "deq", None)
    if deq is not None and deq.last_stats is not None:
        fwd = deq.last_stats.forward
        row["deq"] = f"test fwd steps {fwd.nfe}, rel residual mean {float(fwd.rel.mean()):.3g}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 training images, 1 epoch, 1,000 test images")
    parser.add_argument("--train-subset", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--test-subset", type=int, default=0, help="test images (multiple of 250); 0 = all 10,000")
    parser.add_argument("--out", default="benchmarks/results/deq_fashion.md")
    args = parser.parse_args()
    if args.quick:
        args.train_subset, args.epochs, args.test_subset = 1000, 1, 1000
    adam = lambda p: torch.optim.Adam(p, lr=2e-3)  # noqa: E731
    rows = [
        run("ResNet (2 basic blocks)", ImageClassifier(SmallResNet(), num_classes=10, in_chans=1, optimizer=adam), [], args),
        run(
            "MDEQ-tiny",
            DEQClassifier(num_classes=10, in_chans=1, model_kwargs=MDEQ_TINY, optimizer=adam),
            [DEQWarmup(warmup_steps=100, unroll_layers=4), DEQMonitor(histogram_every_n_epochs=0)],
            args,
        ),
    ]
    test_n = args.test_subset or 10000
    lines = [
        f"Fashion-MNIST, {args.train_subset} training images (subset), {args.epochs} epochs, batch 64, Adam 2e-3; "
        f"accuracy on {test_n} test images.",
        "",
        "| model | params | time / epoch (s) | test acc | notes |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['params']:,} | {r['epoch_s']:.1f} | {100 * r['acc']:.2f} % | {r.get('deq', '')} |"
        for r in rows
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# MDEQ-tiny vs ResNet on Fashion-MNIST\n\n" + text + "\n")


if __name__ == "__main__":
    main()
