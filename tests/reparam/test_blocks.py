"""ACBlock, DiverseBranchBlock and RepVGGBlock: exact equivalence of the fused form, protocol behaviour, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_nd.reparam import ACBlock, DiverseBranchBlock, RepVGGBlock, reparameterize_model
from tests.reparam._helpers import randomize_bn, rel_err

CASES = [
    (RepVGGBlock, {"in_channels": 16, "out_channels": 16}),  # identity branch
    (RepVGGBlock, {"in_channels": 16, "out_channels": 32, "stride": 2, "groups": 4}),
    (RepVGGBlock, {"in_channels": 16, "out_channels": 16, "groups": 16}),  # depthwise with identity
    (RepVGGBlock, {"in_channels": 16, "out_channels": 16, "kernel_size": 5, "dilation": 2}),
    (RepVGGBlock, {"in_channels": 16, "out_channels": 16, "kernel_size": 1}),
    (ACBlock, {"in_channels": 16, "out_channels": 16}),
    (ACBlock, {"in_channels": 16, "out_channels": 16, "kernel_size": 5, "padding": 2}),
    (ACBlock, {"in_channels": 16, "out_channels": 8, "padding": 0}),  # crop
    (ACBlock, {"in_channels": 16, "out_channels": 8, "kernel_size": 5, "padding": 1, "stride": 2}),  # crop, stride 2
    (ACBlock, {"in_channels": 16, "out_channels": 8, "padding": 3}),  # padding > k // 2
    (ACBlock, {"in_channels": 16, "out_channels": 16, "groups": 2, "stride": 2, "dilation": 2}),
    (ACBlock, {"in_channels": 16, "out_channels": 16, "groups": 16}),
    (DiverseBranchBlock, {"in_channels": 16, "out_channels": 16}),
    (DiverseBranchBlock, {"in_channels": 16, "out_channels": 32, "stride": 2}),
    (DiverseBranchBlock, {"in_channels": 16, "out_channels": 32, "kernel_size": 5, "groups": 2}),
    (DiverseBranchBlock, {"in_channels": 16, "out_channels": 16, "groups": 16}),  # depthwise
    (DiverseBranchBlock, {"in_channels": 16, "out_channels": 16, "groups": 16, "stride": 2}),
    (DiverseBranchBlock, {"in_channels": 16, "out_channels": 32, "groups": 16, "internal_channels": 48}),
]


def _ids(case):
    cls, kw = case
    return cls.__name__ + "-" + "-".join(f"{k[:3]}{v}" for k, v in kw.items())


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_fused_block_is_equivalent(case):
    cls, kwargs = case
    torch.manual_seed(0)
    block = randomize_bn(cls(**kwargs)).eval()
    x = torch.randn(2, 16, 17, 17)
    y = block(x)
    block.reparameterize()
    assert block.deploy and isinstance(block.reparam_conv, nn.Conv2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert rel_err(y, block(x)) <= 1e-5
    # the deploy constructor builds the same geometry: the fused state dict loads strictly
    fresh = cls(**kwargs, deploy=True).eval()
    fresh.load_state_dict(block.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), block(x))


def test_reparameterize_is_idempotent_and_keeps_gradients_before():
    block = randomize_bn(DiverseBranchBlock(8, 8)).train()
    block(torch.randn(4, 8, 9, 9)).sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    block.eval()
    block.reparameterize()
    weight = block.reparam_conv.weight.clone()
    block.reparameterize()
    block.switch_to_deploy()
    torch.testing.assert_close(block.reparam_conv.weight, weight)


@pytest.mark.parametrize("cls", [ACBlock, DiverseBranchBlock, RepVGGBlock])
def test_bf16_block_fuses_in_float32_and_stays_bf16(cls):
    block32 = randomize_bn(cls(8, 8)).eval()
    block16 = randomize_bn(cls(8, 8)).eval()
    block16.load_state_dict(block32.state_dict())
    block16.to(torch.bfloat16)
    exact = copy.deepcopy(block16).float()  # the bf16 weights, exactly, in float32
    exact.reparameterize()
    x = torch.randn(2, 8, 9, 9)
    y32 = block32(x)
    block16.reparameterize()
    block32.reparameterize()
    assert block16.reparam_conv.weight.dtype == torch.bfloat16
    y16 = block16(x.to(torch.bfloat16))  # would raise a dtype error if a float32 kernel had leaked in
    assert y16.dtype == torch.bfloat16
    assert rel_err(y32, y16.float()) < 5e-2
    # the bf16 kernel is the float32 kernel rounded once, not a kernel computed in bf16
    torch.testing.assert_close(block16.reparam_conv.weight, exact.reparam_conv.weight.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(block16.reparam_conv.bias, exact.reparam_conv.bias.to(torch.bfloat16), rtol=0, atol=0)


def test_syncbn_blocks_fuse():
    model = nn.Sequential(RepVGGBlock(8, 8), ACBlock(8, 8), DiverseBranchBlock(8, 8))
    model = randomize_bn(nn.SyncBatchNorm.convert_sync_batchnorm(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    x = torch.randn(2, 8, 9, 9)
    fused = reparameterize_model(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in fused.modules())
    assert rel_err(model(x), fused(x)) <= 1e-5


def test_affine_false_bn_fuses():
    block = RepVGGBlock(8, 8)
    block.identity = nn.BatchNorm2d(8, affine=False)
    block = randomize_bn(block).eval()
    x = torch.randn(2, 8, 9, 9)
    y = block(x)
    block.reparameterize()
    assert rel_err(y, block(x)) <= 1e-5


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (RepVGGBlock, {"in_channels": 8, "out_channels": 8, "stride": 2, "use_identity": True}, "use_identity"),
        (RepVGGBlock, {"in_channels": 8, "out_channels": 16, "use_identity": True}, "use_identity"),
        (RepVGGBlock, {"in_channels": 8, "out_channels": 8, "kernel_size": 4}, "even"),
        (RepVGGBlock, {"in_channels": 8, "out_channels": 8, "padding": 0}, "padding"),
        (ACBlock, {"in_channels": 8, "out_channels": 8, "kernel_size": 2}, "even"),
        (ACBlock, {"in_channels": 8, "out_channels": 8, "kernel_size": 1}, ">= 3"),
        (ACBlock, {"in_channels": 8, "out_channels": 12, "groups": 8}, "groups"),
        (DiverseBranchBlock, {"in_channels": 6, "out_channels": 8, "groups": 4}, "groups"),
        (DiverseBranchBlock, {"in_channels": 8, "out_channels": 8, "padding": 0}, "padding"),
        (DiverseBranchBlock, {"in_channels": 8, "out_channels": 0}, "positive"),
    ],
)
def test_bad_geometry_raises(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_auto_identity_only_when_allowed():
    assert RepVGGBlock(8, 8).identity is not None
    assert RepVGGBlock(8, 8, stride=2).identity is None
    assert RepVGGBlock(8, 16).identity is None
    assert RepVGGBlock(8, 8, use_identity=False).identity is None
