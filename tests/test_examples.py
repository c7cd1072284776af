"""Each drop-in example in examples/ runs (on a small budget) and does what it says."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_custom_supernet_example_prunes_and_searches():
    from lightning_nd.nas import alive_options, arch_to_json, space_size
    from lightning_nd.nas.sampler import uniform_archs  # noqa: F401  (the public sampler helpers exist)

    model, tracker, pruner, search, trainer = load("custom_supernet").main(max_epochs=4)
    assert space_size(model.net) < 4**4  # the pruner shrank the space
    best = search.result["best"]
    options = alive_options(model.net)
    assert all(index in alive for index, alive in zip(best["arch"], options))  # only alive ops are chosen
    # the space left is tiny, so the search must have found the best path by angle over all of it
    import itertools

    everything = [list(a) for a in itertools.product(*options)]
    assert best["score"] == pytest.approx(max(tracker.path_angle(a) for a in everything))
    assert best["ops"] == arch_to_json(model.net, best["arch"])["ops"]
    assert (Path(trainer.log_dir) / "arch.json").is_file()


@pytest.mark.slow
def test_timm_reparam_example_writes_an_equivalent_deploy_model():
    model, deploy, (x, y) = load("timm_reparam").main(max_epochs=1)
    from torch import nn

    from lightning_nd.reparam import load_deploy

    # the weights file loaded into the training form: every conv+BN pair fused away, fewer parameters
    (weights,) = Path("runs/timm_reparam").rglob("deploy_weights.pt")
    fused_net = load_deploy(weights, model=model.net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused_net.modules())
    assert sum(p.numel() for p in fused_net.parameters()) < sum(p.numel() for p in model.net.parameters())
    model.eval()
    with torch.no_grad():
        trained = model(x)
    fused = deploy(x)  # the exported program
    assert (trained - fused).abs().max() <= 1e-4 * trained.abs().max()
    assert (fused.argmax(-1) == y).float().mean() > 0.3  # it learned something in one epoch (chance: 0.1)


@pytest.mark.slow
def test_deq_layer_example_trains_and_is_monitored():
    trainer = load("deq_layer").main(max_epochs=1, limit_train_batches=12)
    metrics = trainer.callback_metrics
    assert "deq/unconverged_share" in metrics  # DEQMonitor ran
    assert float(metrics["deq/unconverged_share"]) <= 0.5  # the cell converges
    assert float(metrics["val/acc"]) > 0.3
