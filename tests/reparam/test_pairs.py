"""Conv -> BN pairs from the dataflow: the fx trace and the hooked forward agree, rejected candidates say why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_nd.reparam import convert_model, find_conv_bn_pairs, reparameterize_with_stats
from lightning_nd.reparam.pairs import _decide, _flow_from_hooks
from tests.reparam._helpers import PreActResNet18, randomize_bn, rel_err


class Untraceable(nn.Module):
    """Data-dependent control flow (no fx trace); one shared conv output; a pre-activation BN; a BN called twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)  # a real pair
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)  # conv2's output also feeds the sum
        self.bn3 = nn.BatchNorm2d(8)  # pre-activation: normalises a sum
        self.conv4, self.bn4 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)  # bn4 runs twice

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        y = self.bn2(z) + z
        if y.sum() > -1e9:  # a branch on data: torch.fx cannot trace it
            y = self.bn3(y)
        return self.bn4(self.bn4(self.conv4(y)))


def test_untraceable_model_uses_one_hooked_forward():
    model = randomize_bn(Untraceable()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="does not trace with torch.fx.*pass example_input"):
        find_conv_bn_pairs(model)
    model.bn1.train()  # flags and statistics survive the observing forward
    mean = model.bn1.running_mean.clone()
    found = find_conv_bn_pairs(model, x)
    assert model.bn1.training and torch.equal(model.bn1.running_mean, mean)
    assert found.method == "hooks" and [(p.conv_path, p.bn_path) for p in found.pairs] == [("conv1", "bn1")]
    reasons = {s.bn_path: s.reason for s in found.skipped}
    assert "also feeds 'add'" in reasons["bn2"] and found.rejected[0].conv_path == "conv2"
    assert "not a conv" in reasons["bn3"] and "called 2 times" in reasons["bn4"]
    model.eval()
    with torch.no_grad():
        y = model(x)
        folded, stats = reparameterize_with_stats(model, fold_bn=True, warn=False, example_input=x)
        assert stats.folded_bn == 1 and rel_err(y, folded(x)) <= 1e-5
        assert rel_err(y, convert_model(model, "acb", preserve=True, example_input=x)(x)) <= 1e-5


def test_hooks_and_fx_agree_on_a_preactivation_resnet():
    model = PreActResNet18(width=8).eval()
    traced = find_conv_bn_pairs(model)
    hooked = _decide(model, _flow_from_hooks(model, torch.randn(1, 3, 16, 16)), "hooks")
    assert [(p.conv_path, p.bn_path) for p in traced] == [(p.conv_path, p.bn_path) for p in hooked]
    assert [p.bn_path for p in traced][:2] == ["layer1.0.bn2", "layer1.1.bn2"]  # conv1 feeds bn2, not bn1
    # the stem conv's output feeds layer1.0.bn1 and the residual sum; other bn1s normalise sums
    for found in (traced, hooked):
        assert {(s.bn_path, s.conv_path) for s in found.rejected} == {("layer1.0.bn1", "conv1")}
        assert sorted(s.bn_path for s in found.skipped) == sorted(f"layer{i}.{j}.bn1" for i in range(1, 5) for j in (0, 1))
