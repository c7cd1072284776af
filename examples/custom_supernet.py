"""A user-defined supernet in plain PyTorch: Choice layers + AngleTracker + ProgressivePruner + EvolutionSearch.

Runs in well under 30 s on a CPU:  python examples/custom_supernet.py
"""

import lightning.pytorch as pl
from torch import nn

from lightning_nd.callbacks import AngleTracker, EvolutionSearch, ProgressivePruner
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import Choice, space_size


def conv(c, k):
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class TinySupernet(nn.Module):
    """Stem + 4 searchable layers (3x3 / 5x5 / 1x1 conv or skip) + classifier: 4^4 = 256 paths."""

    def __init__(self, num_classes=10, c=8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.layers = nn.Sequential(
            *[
                Choice({"conv3x3": conv(c, 3), "conv5x5": conv(c, 5), "conv1x1": conv(c, 1), "skip": nn.Identity()})
                for _ in range(4)
            ]
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def main(max_epochs: int = 5, root: str = "runs/custom_supernet"):
    pl.seed_everything(0)
    model = SupernetModule(TinySupernet(), num_classes=10, in_chans=1, calib_batches=5)
    tracker = AngleTracker(every_n_epochs=1)
    pruner = ProgressivePruner(warmup_epochs=2, interval=1, drop_per_step=3, space_threshold=16)
    search = EvolutionSearch(metric="angle", population=16, top_k=4, mutations=6, crossovers=6, generations=5)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=8,
        limit_val_batches=2,
        accelerator="cpu",
        callbacks=[tracker, pruner, search],
        enable_progress_bar=False,
        default_root_dir=root,
    )
    trainer.fit(model, DigitsDataModule(batch_size=64))
    print(f"space left: {space_size(model.net)} paths; searched by angle:", search.result["best"])
    return model, tracker, pruner, search, trainer


if __name__ == "__main__":
    main()
