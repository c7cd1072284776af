"""Every configs/reparam YAML: the CPU ones run one fast_dev_run step through `lnd`, the GPU ones are instantiated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_nd.cli import create_cli, main
from lightning_nd.modules import ImageClassifier
from lightning_nd.reparam import RepVGG

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "reparam"
CPU = ["acb_digits.yaml", "repvgg_digits.yaml", "dbb_fashion_mnist.yaml"]
GPU = ["repvgg_a0_cifar10.yaml", "repvgg_a0_imagenet.yaml"]


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(CPU + GPU)


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU)
def test_cpu_config_fast_dev_run(name, tmp_path):
    if name.startswith("dbb_fashion") and not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Fashion-MNIST package not installed")
    main(["fit", "-c", str(CONFIGS / name), "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.enable_progress_bar=false"])
    assert (tmp_path / "deploy.pt").is_file() and (tmp_path / "reparam_report.json").is_file()


@pytest.mark.parametrize("name", GPU)
def test_gpu_config_instantiates(name):
    cli = create_cli(["-c", str(CONFIGS / name), "--trainer.accelerator=cpu", "--trainer.devices=1",
                      "--trainer.strategy=auto", "--trainer.sync_batchnorm=false"], run=False)
    assert isinstance(cli.model, ImageClassifier) and isinstance(cli.model.net, RepVGG)
    assert cli.trainer.max_epochs in (120, 200)
