"""Model zoo sweep: conv -> BN pairs come from the dataflow, so converting and folding keeps every model's output.

For torchvision (one model per classification family) and a broad timm sample, BN statistics randomised, eval mode:
``convert_model(preserve=True)`` and ``reparameterize_model(fold_bn=True)`` (of the original and of the converted
model) change the output by at most 1e-5 relative to ``max |y|``. The expected pair counts follow from the
architectures (e.g. ResNet-18: stem + 16 3x3 + 3 downsample = 20; a pre-activation block pairs only ``conv1 -> bn2``;
DenseNet-121: stem + ``conv1 -> norm2`` in each of 58 dense layers = 59). The full table is
``benchmarks/reparam_pairs.py``.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision

from lightning_nd.reparam import (
    convert_model_with_report,
    count_batchnorms,
    find_conv_bn_pairs,
    reparameterize_with_stats,
)
from tests.reparam._helpers import PreActResNet18, randomize_bn, rel_err


def _build(source: str, name: str, size: int) -> torch.nn.Module:
    if source == "tv":
        return getattr(torchvision.models, name)(num_classes=10)
    if source == "timm":
        extra = {"img_size": size} if name.startswith("levit") else {}
        return timm.create_model(name, pretrained=False, num_classes=10, **extra)
    return PreActResNet18(width=16)


# (source, model, input size, pairs expected, block for convert_model)
ZOO = [
    ("tv", "resnet18", 32, 20, "acb"),
    ("tv", "resnext50_32x4d", 32, 53, "dbb"),
    ("tv", "densenet121", 32, 59, "repvgg"),
    ("tv", "efficientnet_b0", 32, 49, "acb"),
    ("tv", "mobilenet_v3_small", 32, 34, "dbb"),
    ("tv", "mnasnet0_5", 32, 52, "repvgg"),
    ("tv", "regnet_x_400mf", 32, 71, "acb"),
    ("tv", "shufflenet_v2_x0_5", 32, 56, "dbb"),
    ("tv", "googlenet", 32, 57, "acb"),  # the 2 aux heads do not run in eval: their BNs are "never called"
    ("tv", "inception_v3", 75, 94, "acb"),
    ("tv", "convnext_tiny", 32, 0, None),  # LayerNorm only: zero pairs is right
    ("timm", "resnet18", 32, 20, "dbb"),
    ("timm", "resnet50", 32, 53, "repvgg"),
    ("timm", "resnetv2_50", 32, 32, "acb"),  # pre-activation bottleneck: conv1 -> norm2, conv2 -> norm3
    ("timm", "densenet121", 32, 59, "acb"),
    ("timm", "dpn48b", 32, 33, "dbb"),
    ("timm", "efficientnet_b0", 32, 49, "acb"),  # conv_dw -> bn1 naming
    ("timm", "mobilenetv3_small_100", 32, 34, "repvgg"),
    ("timm", "regnetx_002", 32, 44, "dbb"),
    ("timm", "convnext_atto", 32, 0, None),
    # models of the issue-27 review: every BN follows a conv (regnety: stem + 13 blocks x 3 + 4 downsamples = 44)
    ("timm", "regnety_002", 32, 44, "acb"),
    ("timm", "ghostnet_100", 32, 80, "dbb"),
    ("timm", "rexnet_100", 32, 62, "repvgg"),
    ("timm", "dla34", 32, 37, "acb"),
    # 34 BNs follow a MixedConv2d (convs on channel splits, concatenated: folded slice by slice), 2 a Conv2dSame
    ("timm", "tf_mixnet_s", 32, 49, "dbb"),
    ("timm", "repvgg_a0", 32, 44, None),  # every pair is inside a RepVggBlock: its own reparameterize() fuses it
    ("timm", "mobileone_s0", 32, 191, None),
    ("timm", "fastvit_t8", 64, 46, "acb"),  # the ConvMlp conv -> BN pairs outside the re-param blocks convert
    ("timm", "repvit_m0_9", 64, 83, None),
    ("timm", "levit_conv_128s", 64, 50, None),
    ("preact", "PreActResNet18", 32, 8, "acb"),  # conv1 -> bn2 per block; the names would pair conv1 with bn1
]


@pytest.mark.parametrize(("source", "name", "size", "expected", "block"), ZOO, ids=[f"{s}-{n}" for s, n, *_ in ZOO])
def test_zoo_pairs_convert_and_fold_keep_the_output(source, name, size, expected, block):
    torch.manual_seed(0)
    model = randomize_bn(_build(source, name, size)).eval()
    found = find_conv_bn_pairs(model)
    assert found.method == "fx" and len(found.pairs) == expected
    assert len(found.pairs) + len(found.skipped) == count_batchnorms(model)  # every BN accounted for
    if expected == 0:
        return
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        folded, stats = reparameterize_with_stats(model, fold_bn=True, warn=False)
        assert stats.total > 0 and rel_err(y, folded(x)) <= 1e-5
        if block is None:
            return
        converted = copy.deepcopy(model)
        report = convert_model_with_report(converted, block, preserve=True)
        assert report.converted and rel_err(y, converted(x)) <= 1e-5
        fused = reparameterize_with_stats(converted, fold_bn=True, warn=False)[0]
        assert rel_err(y, fused(x)) <= 1e-5
        assert count_batchnorms(fused) == count_batchnorms(folded)  # the same BNs stay (pre-activation ones)
