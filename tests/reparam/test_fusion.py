"""The fusion functions against the layers they replace (torch's own BN, conv, AvgPool), with random BN statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nd.reparam import (
    avgpool_kernel,
    bn_pad_values,
    center_kernel,
    fold_bn,
    fuse_conv_bn,
    identity_kernel,
    merge_1x1_kxk,
)
from lightning_nd.reparam.dbb import BNAndPad
from tests.reparam._helpers import randomize_bn, rel_err

X = torch.randn(2, 8, 11, 11, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_bn_matches_conv_then_bn(affine, eps, bias):
    conv = nn.Conv2d(8, 6, 3, padding=1, bias=bias)
    bn = randomize_bn(nn.BatchNorm2d(6, eps=eps, affine=affine)).eval()
    w, b = fold_bn(conv.weight, bn, conv.bias)
    assert rel_err(bn(conv(X)), F.conv2d(X, w, b, padding=1)) < 1e-6
    fused = fuse_conv_bn(conv, bn)
    assert rel_err(bn(conv(X)), fused(X)) < 1e-6


def test_fold_bn_accepts_syncbn_and_rejects_no_running_stats():
    conv = nn.Conv2d(8, 6, 3, bias=False)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(conv, randomize_bn(nn.BatchNorm2d(6))))
    assert isinstance(sync[1], nn.SyncBatchNorm)
    sync.eval()
    w, b = fold_bn(conv.weight, sync[1])
    assert rel_err(sync(X), F.conv2d(X, w, b)) < 1e-6
    with pytest.raises(ValueError, match="track_running_stats"):
        fold_bn(conv.weight, nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(TypeError, match="BatchNorm"):
        fold_bn(conv.weight, nn.LayerNorm(6))
    with pytest.raises(ValueError, match="output channels"):
        fold_bn(conv.weight, nn.BatchNorm2d(5))


def test_fold_bn_computes_in_float32_for_bf16():
    conv = nn.Conv2d(8, 6, 3, bias=False).to(torch.bfloat16)
    bn = randomize_bn(nn.BatchNorm2d(6)).to(torch.bfloat16)
    w, b = fold_bn(conv.weight, bn)
    assert w.dtype == torch.float32 and b.dtype == torch.float32
    expected = conv.weight.float() * (bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)).view(-1, 1, 1, 1)
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 1)])
def test_center_kernel_matches_aligned_small_conv(shape):
    k = torch.randn(4, 8, *shape)
    big = center_kernel(k, 3)
    pad = (shape[0] // 2, shape[1] // 2)
    torch.testing.assert_close(F.conv2d(X, big, padding=1), F.conv2d(X, k, padding=pad))
    with pytest.raises(ValueError, match="cannot centre"):
        center_kernel(torch.randn(1, 1, 2, 2), 3)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_identity_kernel_is_identity(groups):
    k = identity_kernel(8, groups, 3)
    torch.testing.assert_close(F.conv2d(X, k, padding=1, groups=groups), X)
    with pytest.raises(ValueError, match="odd"):
        identity_kernel(8, 1, 4)
    with pytest.raises(ValueError, match="divide"):
        identity_kernel(8, 3, 3)


@pytest.mark.parametrize(("groups", "stride", "k"), [(1, 1, 3), (2, 2, 3), (8, 1, 5)])
def test_avgpool_kernel_matches_avgpool(groups, stride, k):
    kernel = avgpool_kernel(8, groups, k)
    pool = nn.AvgPool2d(k, stride, k // 2)  # count_include_pad=True, as a zero-padded conv
    torch.testing.assert_close(F.conv2d(X, kernel, stride=stride, padding=k // 2, groups=groups), pool(X))


@pytest.mark.parametrize(("groups", "mid", "stride"), [(1, 8, 1), (2, 12, 2), (4, 8, 1)])
def test_merge_1x1_kxk_with_bn_value_padding(groups, mid, stride):
    conv1 = nn.Conv2d(8, mid, 1, groups=groups, bias=False)
    pad_bn = randomize_bn(BNAndPad(mid, 1)).eval()
    conv2 = nn.Conv2d(mid, 6 * groups, 3, stride, 0, groups=groups, bias=False)
    bn2 = randomize_bn(nn.BatchNorm2d(6 * groups), seed=3).eval()
    y = bn2(conv2(pad_bn(conv1(X))))
    k1, b1 = fold_bn(conv1.weight, pad_bn.bn)
    k2, b2 = fold_bn(conv2.weight, bn2)
    k, b = merge_1x1_kxk(k1, b1, k2, b2, groups)
    assert rel_err(y, F.conv2d(X, k, b, stride=stride, padding=1, groups=groups)) < 1e-5
    # padding with zeros instead of the BN's value breaks the merge at the borders (DiverseBranchBlock#9)
    naive = bn2(F.conv2d(pad_bn.bn(conv1(X)), conv2.weight, stride=stride, padding=1, groups=groups))
    assert rel_err(y, naive) > 1e-3
    torch.testing.assert_close(pad_bn(conv1(X))[:, :, 0, 0], bn_pad_values(pad_bn.bn).expand(2, -1))
    with pytest.raises(ValueError, match="1x1"):
        merge_1x1_kxk(k2, b2, k2, b2)
