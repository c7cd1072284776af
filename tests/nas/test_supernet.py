import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.parallel import DistributedDataParallel

from lightning_nd.cli import main
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import decisions, set_arch

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nas"


class Record(pl.Callback):
    def __init__(self):
        self.paths, self.checked = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.paths.append(list(pl_module.current_arch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        arch = pl_module.current_arch
        for d, index in zip(decisions(pl_module.net), arch):
            for layer in d.layers:
                for o, op in enumerate(layer.candidates):
                    grads = [p.grad for p in op.parameters()]
                    if o != index:
                        assert all(g is None for g in grads), f"unsampled {d.key}/{d.names[o]} has a gradient"
                    self.checked += len(grads)


def test_one_path_per_optimizer_step_and_unsampled_grads_stay_none():
    model = SupernetModule("nb201", num_classes=10, in_chans=1, input_size=8, space_kwargs={"C": 4, "N": 1},
                           calib_batches=2, seed=5)
    rec = Record()
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[rec], accelerator="cpu")
    trainer.fit(model, DigitsDataModule(batch_size=16))
    assert rec.checked > 0
    assert rec.paths[0::2] == rec.paths[1::2]  # both micro-batches of an optimizer step share the path
    assert rec.paths[0::2] == [model.sampler.sample(s) for s in range(3)]


def test_all_zero_candidate_grads_become_none():
    model = SupernetModule("nb201", num_classes=10, space_kwargs={"C": 4, "N": 1})
    net, arch = model.net, [3, 2, 3, 4, 3, 1]  # every edge on a live path: every sampled op gets a gradient
    set_arch(net, arch)
    torch.manual_seed(0)
    (net(torch.randn(4, 3, 8, 8)) * torch.randn(4, 10)).sum().backward()
    for p in net.parameters():  # zero_grad(set_to_none=False) leaves zero tensors on unsampled ops
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sampled = [p for d, i in zip(decisions(net), arch) for layer in d.layers for p in layer.candidates[i].parameters()]
    assert sampled and all(p.grad.abs().sum() > 0 for p in sampled)
    model.on_before_optimizer_step(torch.optim.SGD(net.parameters(), lr=0.1))
    sampled_ids = {id(p) for p in sampled}
    for d in decisions(net):
        for layer in d.layers:
            for p in layer.candidates.parameters():
                assert (p.grad is not None) == (id(p) in sampled_ids)
    assert net.classifier.weight.grad is not None


def test_evaluate_arch_restores_state():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    model = SupernetModule("nb201", num_classes=10, in_chans=1, space_kwargs={"C": 4, "N": 1})
    bn = next(m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before, arch = bn.running_mean.clone(), list(model.current_arch)
    acc = model.evaluate_arch([3] * 6, dm.train_dataloader(), dm.val_dataloader(), calib_batches=2, val_batches=2)
    assert 0.0 <= acc <= 1.0
    assert torch.equal(bn.running_mean, before) and model.current_arch == arch and model.net.training


def test_plain_ddp_is_rejected_with_a_hint():
    model = SupernetModule("nb201", num_classes=10, space_kwargs={"C": 4, "N": 1})
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)
    object.__setattr__(ddp, "find_unused_parameters", False)
    model.trainer = SimpleNamespace(strategy=SimpleNamespace(model=ddp))
    with pytest.raises(MisconfigurationException, match="ddp_find_unused_parameters_true"):
        model.on_fit_start()


def test_bad_inputs():
    with pytest.raises(ValueError, match="no Choice"):
        SupernetModule(torch.nn.Linear(2, 2), num_classes=2)
    with pytest.raises(ValueError, match="unknown search space"):
        SupernetModule("no_such_space")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nb201_digits.yaml", "nb201_fashion.yaml"])
def test_cpu_configs_fast_dev_run(name):
    if "fashion" in name and not Path("/usr/share/datasets/fashion-mnist").exists() and not os.environ.get("CI"):  # CI installs it: never skip there
        pytest.skip("Fashion-MNIST package not installed")
    main(["fit", "-c", str(CONFIGS / name), "--trainer.fast_dev_run=1"])
