"""Fusion math of structural re-parameterization: every branch of a block becomes one ``k x k`` kernel and bias.

A training-time block sums branches that are each *linear* in the input at inference (BatchNorm uses its running
statistics), so the sum is one convolution. The transforms, in the numbering of the DBB paper:

* **I** BN folding: ``W' = W * t``, ``b' = beta + (b - mu) * t`` with ``t = gamma / sqrt(var + eps)``, each BN's own
  ``eps``; ``affine=False`` means ``gamma = 1, beta = 0``. Any ``_BatchNorm`` works (``SyncBatchNorm`` included).
* **II** branch addition: kernels and biases add.
* **III** a ``1x1`` conv followed by a ``k x k`` conv: ``K = conv2d(K2, K1^T)``, ``b = sum K2 * b1 + b2``, exact only if
  the ``k x k`` conv sees the first stage padded with ``b1`` (:func:`bn_pad_values`), not zeros.
* **IV** groups: III per group slice, then concatenation.
* **V** average pooling as a kernel with ``1/k^2`` on each channel's own input (``count_include_pad=True``).
* **VI** smaller kernels (``1x1``, ``1xk``, ``kx1``) are zero-padded to the centre of the ``k x k`` kernel; identity is
  a ``1x1`` kernel with a one on each channel's own input.

All arithmetic runs in float32 (or float64 if given) on the weights' device: callers cast the result back, so bf16
and fp16 models fuse without float32 leaking into the deploy model.

Example::

    k, b = fold_bn(conv.weight, bn)                    # conv (no bias) -> BN
    k1, b1 = fold_bn(conv1x1.weight, bn1x1)
    k, b = k + center_kernel(k1, (3, 3)), b + b1       # RepVGG's 3x3 + 1x1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "avgpool_kernel",
    "bn_pad_values",
    "bn_scale_shift",
    "center_kernel",
    "fold_bn",
    "fuse_conv_bn",
    "identity_kernel",
    "memory_format_of",
    "merge_1x1_kxk",
    "work_dtype",
]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fusion arithmetic runs in: float64 stays, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(weight: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D weight stored channels-last (and not also plain contiguous), else contiguous."""
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_bn(bn: nn.Module) -> None:
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"expected a BatchNorm (torch.nn.modules.batchnorm._BatchNorm), got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__}({bn.num_features}) has track_running_stats=False: it normalises with batch "
            "statistics at inference too, so it cannot be folded into a convolution"
        )


def bn_scale_shift(bn: _BatchNorm, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, shift)`` with ``BN(x) = t * x + shift`` at inference: ``t = gamma / sqrt(var + eps)``,
    ``shift = beta - mean * t``; ``gamma = 1, beta = 0`` when the BN is not affine.

    Raises:
        TypeError: for a module that is not a ``_BatchNorm``.
        ValueError: for a BN without running statistics.
    """
    _check_bn(bn)
    mean = bn.running_mean.detach().to(dtype)
    var = bn.running_var.detach().to(dtype)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else torch.zeros_like(mean)
    t = gamma / torch.sqrt(var + bn.eps)
    return t, beta - mean * t


def fold_bn(
    kernel: torch.Tensor, bn: _BatchNorm, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform I: the kernel and bias of ``BN(conv(x, kernel) + bias)``, in float32 (float64 stays float64).

    Uses :func:`torch.nn.utils.fusion.fuse_conv_bn_weights` on float32 copies, so each BN's own ``eps`` is used and
    ``affine=False`` works; works in any BN mode because only running statistics are read.

    Raises:
        TypeError: for a module that is not a ``_BatchNorm``.
        ValueError: for a BN without running statistics, or a kernel whose output channels differ from the BN's.
    """
    _check_bn(bn)
    if kernel.shape[0] != bn.num_features:
        raise ValueError(f"kernel has {kernel.shape[0]} output channels but the BN has {bn.num_features} features")
    dt = work_dtype(kernel.dtype)
    w, b = fuse_conv_bn_weights(
        kernel.detach().to(dt),
        None if bias is None else bias.detach().to(dt),
        bn.running_mean.detach().to(dt),
        bn.running_var.detach().to(dt),
        bn.eps,
        None if bn.weight is None else bn.weight.detach().to(dt),
        None if bn.bias is None else bn.bias.detach().to(dt),
    )
    return w.data, b.data


def bn_pad_values(bn: _BatchNorm, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-channel output of the BN for a zero input, ``beta - mean * gamma / std``: the value that a BN-then-pad
    layer must pad with so that the following ``k x k`` conv can be merged with the preceding ``1x1`` (transform III).
    """
    return bn_scale_shift(bn, dtype)[1]


def center_kernel(kernel: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Transform VI: zero-pad a ``(O, I, h, w)`` kernel to ``size`` with the small kernel at the centre.

    Turns ``1x1``, ``1xk`` and ``kx1`` kernels into ``k x k`` ones (valid when the small conv's padding is aligned so
    its taps read the centre row/column of the big conv's window).

    Raises:
        ValueError: if the kernel is larger than ``size`` or the size difference is odd (no centre).
    """
    kh, kw = (size, size) if isinstance(size, int) else size
    h, w = kernel.shape[-2:]
    if h > kh or w > kw or (kh - h) % 2 or (kw - w) % 2:
        raise ValueError(f"cannot centre a {h}x{w} kernel in a {kh}x{kw} kernel (needs odd, non-negative margins)")
    dh, dw = (kh - h) // 2, (kw - w) // 2
    return F.pad(kernel, [dw, dw, dh, dh])


def _diagonal_kernel(
    channels: int, groups: int, kernel_size: int, value: float, centre_only: bool, dtype: torch.dtype, device
) -> torch.Tensor:
    if channels % groups:
        raise ValueError(f"groups={groups} does not divide channels={channels}")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    if centre_only:
        kernel[idx, idx % per_group, kernel_size // 2, kernel_size // 2] = value
    else:
        kernel[idx, idx % per_group] = value
    return kernel


def identity_kernel(
    channels: int,
    groups: int = 1,
    kernel_size: int = 3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A ``(C, C/g, k, k)`` kernel computing the identity: ``K[i, i % (C/g), k//2, k//2] = 1``.

    Works for grouped and depthwise convolutions; needs ``in == out`` channels and stride 1 in the block.

    Raises:
        ValueError: if ``groups`` does not divide ``channels`` or the kernel size is even.
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"identity needs an odd kernel size, got {kernel_size}")
    return _diagonal_kernel(channels, groups, kernel_size, 1.0, True, dtype, device)


def avgpool_kernel(
    channels: int,
    groups: int = 1,
    kernel_size: int = 3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Transform V: ``AvgPool2d(k)`` (``count_include_pad=True``) as a ``(C, C/g, k, k)`` kernel with ``1/k^2`` on
    each channel's own input.

    Raises:
        ValueError: if ``groups`` does not divide ``channels``.
    """
    return _diagonal_kernel(channels, groups, kernel_size, 1.0 / kernel_size**2, False, dtype, device)


def merge_1x1_kxk(
    k1: torch.Tensor, b1: torch.Tensor, k2: torch.Tensor, b2: torch.Tensor, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transforms III + IV: one kernel for ``conv(pad_b1(conv(x, k1) + b1), k2) + b2``.

    ``k1`` is ``(M, I/g, 1, 1)`` and ``k2`` is ``(O, M/g, k, k)``; the result is ``(O, I/g, k, k)``. The second conv must
    see the first stage's output padded with ``b1`` (see :func:`bn_pad_values`).

    Raises:
        ValueError: on shapes that do not chain or groups that do not divide the channel counts.
    """
    if k1.shape[-2:] != (1, 1):
        raise ValueError(f"first kernel must be 1x1, got {tuple(k1.shape[-2:])}")
    mid, out = k1.shape[0], k2.shape[0]
    if mid % groups or out % groups or k2.shape[1] * groups != mid:
        raise ValueError(f"kernels {tuple(k1.shape)} and {tuple(k2.shape)} do not chain with groups={groups}")
    m, o = mid // groups, out // groups
    kernels, biases = [], []
    for g in range(groups):
        k1_t = k1[g * m : (g + 1) * m].permute(1, 0, 2, 3)  # (I/g, m, 1, 1)
        k2_g = k2[g * o : (g + 1) * o]  # (o, m, k, k)
        kernels.append(F.conv2d(k2_g, k1_t))
        biases.append((k2_g * b1[g * m : (g + 1) * m].reshape(1, -1, 1, 1)).sum((1, 2, 3)))
    return torch.cat(kernels), torch.cat(biases) + b2


def fuse_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> nn.Conv2d:
    """A new ``Conv2d`` (with bias) equal to ``bn(conv(x))`` at inference; same dtype, device and geometry.

    Raises:
        TypeError: if ``conv`` is not a ``Conv2d`` or ``bn`` not a ``_BatchNorm``.
        ValueError: for a BN without running statistics or mismatched channels.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
    w, b = fold_bn(conv.weight, bn, conv.bias)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(w)
        fused.bias.copy_(b)
    fused.train(conv.training)
    return fused
