"""Re-parameterization dropped into a plain Lightning script with a timm model.

``ReparamConvert("acb")`` turns every conv+BN pair of timm's ResNet into an ACNet block (kxk + 1xk + kx1 branches) in
``setup``, before the optimizer and DDP exist; after fit, ``ReparamFuse`` folds each block back into one convolution,
checks the deploy network against the trained one on a real batch, and writes ``deploy.pt2`` (a self-contained
``torch.export`` program) and ``deploy_weights.pt`` to the run directory.

    python examples/timm_reparam.py            (about half a minute on a 2-core CPU)
"""

from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_nd.callbacks import ReparamConvert, ReparamFuse
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import ImageClassifier
from lightning_nd.reparam import load_deploy


def main(max_epochs: int = 3, root: str = "runs/timm_reparam", limit_train_batches: int | None = None):
    pl.seed_everything(0)
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1)  # any timm model name, built offline
    datamodule = DigitsDataModule(image_size=16, batch_size=64)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        default_root_dir=root,
        limit_train_batches=limit_train_batches,
        callbacks=[ReparamConvert(block="acb"), ReparamFuse()],
    )
    trainer.fit(model, datamodule=datamodule)

    deploy = load_deploy(Path(trainer.log_dir) / "deploy.pt2")  # needs no training code
    x, y = datamodule.sample_batch(256)
    model.eval()
    with torch.no_grad():
        trained = model(x)
    fused = deploy(x)  # an exported program: inference semantics built in
    print(
        f"deploy accuracy {(fused.argmax(-1) == y).float().mean():.3f}, "
        f"max |trained - deploy| {(trained - fused).abs().max():.2e}"
    )
    return model, deploy, (x, y)


if __name__ == "__main__":
    main()
