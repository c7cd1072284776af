"""Every configs/reparam YAML: the CPU ones run one training step through `lnd`, the GPU ones are instantiated.

The config files stay sized for a real run; the tests shrink the data through CLI overrides (small batches, a small
Fashion-MNIST subset) so that each run costs a few seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lightning_nd.cli import create_cli, main
from lightning_nd.modules import ImageClassifier
from lightning_nd.reparam import ACBlock, RepVGG, load_deploy
from tests.reparam._helpers import rel_err

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "reparam"
CPU = ["acb_digits.yaml", "repvgg_digits.yaml", "dbb_fashion_mnist.yaml"]
CHEAP = {"dbb_fashion_mnist.yaml": ["--data.train_subset=64", "--data.val_size=64"]}  # per-config extra overrides
GPU = {"repvgg_a0_cifar10.yaml": 200, "repvgg_a0_imagenet.yaml": 120}  # name: epochs (paper recipe)


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*CPU, *GPU])


@pytest.mark.parametrize("name", [n for n in CPU if n != "acb_digits.yaml"])  # acb: the checkpoint test below
def test_cpu_config_fast_dev_run(name, tmp_path):
    if name.startswith("dbb_fashion") and not os.path.isdir("/usr/share/datasets/fashion-mnist") and not os.environ.get("CI"):  # CI installs it: never skip there
        pytest.skip("Fashion-MNIST package not installed")
    main(["fit", "-c", str(CONFIGS / name), "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.enable_progress_bar=false", "--data.batch_size=4", *CHEAP.get(name, [])])
    report = json.loads((tmp_path / "reparam_report.json").read_text())
    assert report["passed"] and report["batchnorms_train"] > 0 and report["batchnorms_deploy"] == 0
    assert (tmp_path / "deploy.pt2").is_file()


@pytest.mark.parametrize("name", GPU)
def test_gpu_config_instantiates(name):
    cli = create_cli(["-c", str(CONFIGS / name), "--trainer.accelerator=cpu", "--trainer.devices=1",
                      "--trainer.strategy=auto", "--trainer.sync_batchnorm=false"], run=False)
    assert isinstance(cli.model, ImageClassifier) and isinstance(cli.model.net, RepVGG)
    assert cli.trainer.max_epochs == GPU[name]
    optimizer = cli.model.optimizer(cli.model.parameters())  # the paper's recipe, not the default optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)


def test_acb_digits_checkpoint_loads_without_the_callbacks(tmp_path):
    """`lnd fit -c acb_digits.yaml` on a two-step budget (the config's fast_dev_run check: verified, BN-free deploy
    file); `ImageClassifier.load_from_checkpoint(ckpt)` rebuilds resnet10t (saved in the hyperparameters) with its
    ACBlocks and equals the verified deploy program. (A limit of "1" would parse as the float 1.0: every batch.)"""
    main(["fit", "-c", str(CONFIGS / "acb_digits.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.enable_progress_bar=false", "--data.batch_size=4"])
    report = json.loads(next(tmp_path.rglob("reparam_report.json")).read_text())
    assert report["passed"] and report["batchnorms_train"] > 0 and report["batchnorms_deploy"] == 0
    (ckpt,) = tmp_path.rglob("last.ckpt")
    (program,) = tmp_path.rglob("deploy.pt2")
    model = ImageClassifier.load_from_checkpoint(ckpt).eval()
    assert model.hparams.model == "resnet10t" and sum(isinstance(m, ACBlock) for m in model.net.modules()) == 11
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        assert rel_err(y, load_deploy(program)(x)) <= 1e-5  # ~12 folded float32 layers
