"""Whole models: our RepVGG against timm's, timm's re-parameterizable families, convert_model, deploy files."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from lightning_nd.reparam import (
    ACBlock,
    ReparamBlock,
    RepVGG,
    RepVGGBlock,
    convert_model,
    count_batchnorms,
    load_deploy,
    reparameterize_model,
    reparameterize_with_stats,
    repvgg_a0,
    save_deploy,
)
from lightning_nd.reparam.convert import BLOCKS
from lightning_nd.reparam.deploy_io import deploy_kind, weights_path
from tests.reparam._helpers import randomize_bn, rel_err


def test_registered_in_timm_without_clashing():
    ours = timm.list_models("lnd_repvgg*")
    assert ours == sorted(f"lnd_repvgg_{v}" for v in ("a0", "a1", "a2", "b0", "b1", "b2", "b3"))
    assert "repvgg_a0" in timm.list_models("repvgg*")  # timm's own name still points at timm's model
    model = timm.create_model("lnd_repvgg_a0", num_classes=10, in_chans=1)
    assert isinstance(model, RepVGG) and model.head.fc.out_features == 10
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("lnd_repvgg_a0", pretrained=True)


def test_repvgg_a0_matches_timm_weights_and_parameter_counts():
    ours, theirs = repvgg_a0(), randomize_bn(timm.create_model("repvgg_a0", pretrained=False)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same layout and keys as timm's byobnet RepVGG
    ours.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        fused, fused_timm = reparameterize_model(ours), timm.utils.reparameterize_model(theirs)
        assert rel_err(ours(x), fused(x)) <= 1e-5
        assert rel_err(fused_timm(x), fused(x)) <= 1e-5
    # the paper / mmpretrain table: RepVGG-A0 9.11M -> 8.31M parameters (1000 classes)
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 2) == 9.11
    assert round(sum(p.numel() for p in fused.parameters()) / 1e6, 2) == 8.31
    assert count_batchnorms(fused) == 0
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 22
    deploy = RepVGG(deploy=True)
    deploy.load_state_dict(fused.state_dict(), strict=True)


TIMM_MODELS = [("repvgg_a0", 32), ("mobileone_s0", 32), ("fastvit_t8", 64), ("repvit_m0_9", 64)]


@pytest.mark.parametrize(("name", "size"), TIMM_MODELS)
def test_timm_models_fuse_exactly_and_twice(name, size):
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        fused, stats = reparameterize_with_stats(model, fold_bn=True)
        assert stats.total > 0 and count_batchnorms(fused) == 0
        assert rel_err(y, fused(x)) <= 1e-5
        # a second conversion calls no converter again (timm's FastViT RepMixer would raise AttributeError)
        with pytest.warns(UserWarning, match="already converted"):
            again = reparameterize_model(fused, fold_bn=True)
        torch.testing.assert_close(again(x), fused(x))


def test_root_module_is_converted_and_training_flag_kept():
    block = randomize_bn(RepVGGBlock(8, 8)).train()
    fused = reparameterize_model(block)
    assert fused.reparam_conv is not None and fused.training  # timm's helper leaves the root unfused
    assert block.reparam_conv is None  # not in place by default


def test_nothing_to_fuse_warns():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="nothing to fuse"):
        reparameterize_model(plain)
    with pytest.raises(ValueError, match="methods"):
        reparameterize_model(plain, methods=("convert",))


class UserCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.features = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                                      nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.features(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


MODELS = {
    "timm_resnet": lambda: timm.create_model("resnet10t", pretrained=False, num_classes=5),
    # torchvision's ResNet-18 layout (conv1/bn1 siblings, downsample Sequentials) with one block per stage: half the cost
    "torchvision_resnet": lambda: torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5),
    "user_cnn": UserCNN,
}


@pytest.mark.parametrize(
    ("name", "block"),
    [("timm_resnet", "acb"), ("torchvision_resnet", "dbb"), ("torchvision_resnet", "repvgg"), ("user_cnn", "acb"),
     ("user_cnn", "dbb"), ("user_cnn", "repvgg")],
)
def test_convert_model_preserve_keeps_outputs_and_fuses_back(name, block):
    torch.manual_seed(0)
    model = randomize_bn(MODELS[name]())
    x = torch.randn(2, 3, 24, 24)
    twin = copy.deepcopy(model).train()  # train-mode forwards update running statistics: use a twin
    y_train = twin(x)
    twin = convert_model(copy.deepcopy(model), block, preserve=True).train()
    assert rel_err(y_train, twin(x)) <= 1e-5  # the same function in train mode (batch statistics) ...
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    convert_model(model, block, preserve=True)
    blocks = [m for m in model.modules() if isinstance(m, ReparamBlock)]
    assert blocks and count_batchnorms(model) > len(blocks)
    with torch.no_grad():
        assert rel_err(y_eval, model(x)) <= 1e-5  # ... and in eval mode
        fused = reparameterize_model(model, fold_bn=True)
        assert rel_err(y_eval, fused(x)) <= 1e-5
    assert count_batchnorms(fused) == 0
    if name == "timm_resnet":  # the deep stem's last conv (inside conv1) pairs with the root's bn1
        assert isinstance(model.conv1[-1], BLOCKS[block]) and isinstance(model.bn1, nn.Identity)


def test_convert_model_from_scratch_changes_function_and_trains():
    model = UserCNN()
    convert_model(model, "acb", gamma_init=1 / 3)
    assert isinstance(model.conv1, ACBlock) and isinstance(model.bn1, nn.Identity)
    assert isinstance(model.features[6], nn.Conv2d)  # 1x1 conv stays
    torch.testing.assert_close(model.conv1.ver.bn.weight, torch.full((8,), 1 / 3))
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.conv1.hor.conv.weight.grad is not None


def test_convert_model_bad_input():
    with pytest.raises(ValueError, match="block="):
        convert_model(UserCNN(), "mobileone")
    with pytest.raises(ValueError, match="no eligible"):
        convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "acb")
    with pytest.raises(ValueError, match="no eligible"):
        convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "dbb")


def test_deploy_save_load_same_outputs(tmp_path):
    model = randomize_bn(convert_model(UserCNN(), "dbb")).eval()
    x = torch.randn(2, 3, 16, 16)
    fused = reparameterize_model(model, fold_bn=True)
    path = save_deploy(fused, tmp_path / "deploy.pt2", x, report={"max_rel_error": 0.0}, fold_bn=True)
    weights = weights_path(path)
    assert deploy_kind(path) == "program" and deploy_kind(weights) == "weights"
    assert torch.load(weights, weights_only=True)["report"] == {"max_rel_error": 0.0}  # plain data: weights_only
    with torch.no_grad():
        program = load_deploy(path)
        torch.testing.assert_close(program(x), fused(x), rtol=1e-6, atol=1e-6)
        assert program(torch.randn(5, 3, 16, 16)).shape == (5, 5)  # dynamic batch dimension
        # fuse a fresh training form of the same architecture, then load strictly
        fresh = convert_model(UserCNN(), "dbb")
        torch.testing.assert_close(load_deploy(weights, model=fresh)(x), fused(x), rtol=0, atol=0)
        # every block fuses to the same deploy architecture: an ACB-trained form loads the DBB deploy weights
        torch.testing.assert_close(load_deploy(weights, model=convert_model(UserCNN(), "acb"))(x), fused(x))
    with pytest.raises(RuntimeError, match="does not fit RepVGGBlock fused with fold_bn=True .* keys missing"):
        load_deploy(weights, model=RepVGGBlock(3, 8))
    with pytest.raises(FileNotFoundError):
        load_deploy(tmp_path / "missing.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lightning_nd deploy weights file"):
        load_deploy(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a torch archive"):
        load_deploy(tmp_path / "text.pt")


class FuseChild(nn.Module):
    """A model whose feature-fusion child is named ``fuse``: a module, not the protocol's ``fuse()`` method."""

    def __init__(self):
        super().__init__()
        self.a, self.fuse = RepVGGBlock(3, 8), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.fuse(self.a(x))


def test_child_named_fuse_is_not_the_protocol_method():
    model = randomize_bn(FuseChild()).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, stats = reparameterize_with_stats(model, fold_bn=True)
    assert stats.converted == {"reparameterize": 1} and stats.folded_bn == 1
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-5
