"""A user model with a DEQ layer in a plain Lightning script, monitored by DEQMonitor.

The equilibrium layer z* = tanh(W z* + U x) replaces a stack of weight-tied layers; DEQMonitor logs the solver's
steps and residuals and stops the run with a clear message if the residual explodes or turns NaN.

    python examples/deq_layer.py            (about half a minute on a 2-core CPU)
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nd.callbacks import DEQMonitor
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.implicit import DEQ


class TanhCell(nn.Module):
    """f(z, x) = tanh(conv(z) + x), with a small initial conv so that the map starts contractive."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


class DEQNet(nn.Module):
    def __init__(self, channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.inject = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.GroupNorm(4, channels))
        self.deq = DEQ(TanhCell(channels), f_solver="anderson", f_max_iter=20, f_tol=1e-3)
        self.head = nn.Linear(channels * 8 * 8, num_classes)  # digits are 8x8

    def forward(self, x):
        z = self.deq(self.inject(x))
        return self.head(z.flatten(1))


class LitDEQ(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = DEQNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main(max_epochs: int = 2, root: str = "runs/deq_layer", limit_train_batches: int | None = None) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        default_root_dir=root,
        callbacks=[DEQMonitor()],
        log_every_n_steps=5,
        limit_train_batches=limit_train_batches,
    )
    trainer.fit(LitDEQ(), DigitsDataModule(batch_size=64))
    return trainer


if __name__ == "__main__":
    trainer = main()
    print("val/acc:", float(trainer.callback_metrics["val/acc"]), "logs in", trainer.log_dir)
