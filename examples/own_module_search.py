"""Drop-in NAS with your own LightningModule: sample one path per step (``PathSampler`` + ``set_arch``), then search.

``SupernetModule`` does the sampling for you; a module of your own must do it itself, or every step trains the same
path and the angle / NASWOT search ranks an untrained space. The three lines that matter are marked ``# (1)``-``(3)``:

1. a ``PathSampler`` with an explicit seed (every DDP rank must draw the same path: one path per global batch);
2. ``set_arch(self.net, self.sampler.sample(self.global_step))`` at the start of every training batch;
3. under DDP, ``strategy="ddp_find_unused_parameters_true"`` (or ``"ddp_spawn_find_unused_parameters_true"``): the
   unsampled candidates get no gradient, which plain DDP rejects (``EvolutionSearch`` says so at fit start).

After a ``ddp_spawn`` fit the callbacks in the launching process hold nothing (``search.result is None``): the search
ran in the spawned processes. Read ``arch.json`` from the search's ``dirpath`` instead, as ``main`` does.

Runs in about 10 s on a CPU:  python examples/own_module_search.py  [--ddp-spawn]
"""

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_nd.callbacks import AngleTracker, EvolutionSearch
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.nas import Choice, PathSampler, set_arch


def conv(c, k):
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class TinySpace(nn.Module):
    """Stem + 3 searchable layers (3x3 conv, 1x1 conv or skip) + classifier: 3^3 = 27 paths."""

    def __init__(self, num_classes=10, c=8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.layers = nn.Sequential(
            *[Choice({"conv3x3": conv(c, 3), "conv1x1": conv(c, 1), "skip": nn.Identity()}) for _ in range(3)]
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


class MySearchModule(pl.LightningModule):
    """A plain LightningModule around a supernet: the callbacks find the network at ``self.net``."""

    def __init__(self, seed: int = 0, lr: float = 0.05):
        super().__init__()
        self.net = TinySpace()
        self.sampler = PathSampler(self.net, seed=seed)  # (1) the same seed on every rank
        self.lr = lr
        self.trained_archs: list[list[int]] = []

    def forward(self, x):
        return self.net(x)

    def on_train_batch_start(self, batch, batch_idx):
        arch = self.sampler.sample(self.global_step)  # (2) one path per step, a function of (seed, step)
        set_arch(self.net, arch)
        self.trained_archs.append(arch)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(ddp_spawn: bool = False, max_epochs: int = 2, limit_train_batches: int = 10,
         root: str = "runs/own_module_search") -> dict:
    """Train the supernet with one sampled path per step, search it by angle; return ``arch.json``'s content."""
    pl.seed_everything(0)
    search = EvolutionSearch(metric="angle", population=12, top_k=4, mutations=4, crossovers=4, generations=3,
                             seed=0, dirpath=root)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        limit_val_batches=0,
        accelerator="cpu",
        devices=2 if ddp_spawn else 1,
        strategy="ddp_spawn_find_unused_parameters_true" if ddp_spawn else "auto",  # (3)
        callbacks=[AngleTracker(every_n_epochs=1), search],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=root,
    )
    trainer.fit(MySearchModule(seed=0), DigitsDataModule(batch_size=32))
    # after ddp_spawn, search.result is None here (the search ran in the spawned processes): read the file
    result = search.result if search.result is not None else json.loads((Path(root) / "arch.json").read_text())
    print("searched by angle:", result["best"]["ops"], "score", result["best"]["score"],
          "params", result["best"]["params"])
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ddp-spawn", action="store_true", help="2 CPU processes (gloo) instead of one")
    main(ddp_spawn=parser.parse_args().ddp_spawn)
