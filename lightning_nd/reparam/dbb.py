"""Diverse Branch Block (ACNet v2 / DBB, Ding et al., CVPR 2021): four branches of different receptive fields.

Branches (each ends in a BN; summed, then an optional activation):

* ``dbb_origin``: ``k x k`` conv + BN;
* ``dbb_1x1``: ``1x1`` conv + BN (absent for a depthwise block);
* ``dbb_avg``: ``1x1`` conv -> BN-and-pad -> ``AvgPool(k, stride)`` -> BN (a depthwise block pools the input directly);
* ``dbb_1x1_kxk``: ``1x1`` conv (identity-based: a learned kernel that starts at zero plus a fixed identity, when it
  keeps the channel count) -> BN-and-pad -> ``k x k`` conv -> BN.

The ``1x1 -> k x k`` merges (transforms III/IV) are exact only because the intermediate BN pads with its own output for
a zero input (:class:`BNAndPad`), not with zeros (DingXiaoH/DiverseBranchBlock#9). Requires ``padding == k // 2`` and
dilation 1, as the official block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nd.reparam.base import ActLayer, ConvBN, ReparamBlock, check_geometry
from lightning_nd.reparam.fusion import (
    avgpool_kernel,
    bn_pad_values,
    center_kernel,
    fold_bn,
    identity_kernel,
    merge_1x1_kxk,
    work_dtype,
)


class BNAndPad(nn.Module):
    """BatchNorm, then padding of ``pad`` pixels with the BN's output for a zero input (from running statistics).

    Args:
        num_features: channels.
        pad: pixels added on each side.

    Raises:
        ValueError: from ``nn.BatchNorm2d`` for a non-positive ``num_features``.

    Example::

        layer = BNAndPad(16, pad=1)    # (N, 16, H, W) -> (N, 16, H + 2, W + 2)
    """

    def __init__(self, num_features: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        p = self.pad
        values = bn_pad_values(self.bn, work_dtype(out.dtype)).to(out.dtype).view(1, -1, 1, 1)
        border = F.pad(out.new_zeros(1, 1, out.shape[-2], out.shape[-1]), [p, p, p, p], value=1.0)
        return F.pad(out, [p, p, p, p]) + border * values


class IdentityBasedConv1x1(nn.Conv2d):
    """A ``1x1`` conv (no bias) whose kernel is a learned part, initialised to zero, plus a fixed identity.

    Args:
        channels: input and output channels.
        groups: groups of the conv.

    Raises:
        ValueError: when ``groups`` does not divide ``channels``.

    Example::

        conv = IdentityBasedConv1x1(16)   # starts as the identity map
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        nn.init.zeros_(self.weight)
        self.register_buffer("id_tensor", identity_kernel(channels, groups, 1), persistent=False)

    def actual_kernel(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The kernel the conv applies: learned part + identity (summed in ``dtype``, default the weight's)."""
        dtype = dtype or self.weight.dtype
        return self.weight.to(dtype) + self.id_tensor.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.actual_kernel(), None, self.stride, self.padding, self.dilation, self.groups)


class DiverseBranchBlock(ReparamBlock):
    """The DBB: four branches summed, fused by :meth:`reparameterize` into one ``k x k`` conv with bias.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size >= 3.
        stride: stride of every branch.
        padding: must be ``kernel_size // 2`` (the default).
        groups: groups of every conv; ``groups == in_channels == out_channels`` is depthwise (no ``1x1`` branch,
            the average branch pools the input directly).
        internal_channels: width of the ``1x1 -> k x k`` branch; default ``in_channels`` (``2 * in_channels`` when
            depthwise, as the official code).
        act_layer: activation after the sum; ``None`` (default) for none.
        deploy: build the fused form directly.

    Raises:
        ValueError: for an even or 1x1 kernel, a padding other than ``kernel_size // 2``, groups that do not divide the
            channels or the internal width.

    Example::

        block = DiverseBranchBlock(32, 64, 3, stride=2, groups=2)
        block.eval().reparameterize()
    """

    _branch_names = ("dbb_origin", "dbb_1x1", "dbb_avg", "dbb_1x1_kxk")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        internal_channels: int | None = None,
        act_layer: ActLayer | None = None,
        deploy: bool = False,
    ) -> None:
        check_geometry("DiverseBranchBlock", in_channels, out_channels, kernel_size, stride, groups)
        if kernel_size < 3:
            raise ValueError(f"DiverseBranchBlock: kernel_size={kernel_size} must be >= 3")
        padding = kernel_size // 2 if padding is None else padding
        if padding != kernel_size // 2:
            raise ValueError(
                f"DiverseBranchBlock: padding={padding} must be kernel_size // 2 = {kernel_size // 2} (the pooling and "
                "1x1 -> kxk branches are only equivalent to a conv with that padding)"
            )
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, 1, groups, act_layer, deploy)
        self.depthwise = groups == in_channels == out_channels
        if deploy:
            return
        k, p = kernel_size, padding
        self.dbb_origin = ConvBN(in_channels, out_channels, k, stride, p, 1, groups)
        self.dbb_1x1 = None if self.depthwise else ConvBN(in_channels, out_channels, 1, stride, 0, 1, groups)
        self.dbb_avg = nn.Sequential()
        if self.depthwise:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, p))
        else:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPad(out_channels, p))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        internal = internal_channels or (2 * in_channels if self.depthwise else in_channels)
        if internal % groups:
            raise ValueError(f"DiverseBranchBlock: groups={groups} must divide internal_channels={internal}")
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(internal, p))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        if self.dbb_1x1 is not None:
            out = out + self.dbb_1x1(x)
        return out

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = self.dbb_origin.kernel_bias()
        dt, dev, g, k = work_dtype(kernel.dtype), kernel.device, self.groups, self.kernel_size
        if self.dbb_1x1 is not None:
            k1, b1 = self.dbb_1x1.kernel_bias()
            kernel, bias = kernel + center_kernel(k1, k), bias + b1
        # 1x1 -> kxk
        seq = self.dbb_1x1_kxk
        first = seq.idconv1.actual_kernel(dt) if hasattr(seq, "idconv1") else seq.conv1.weight
        k1, b1 = fold_bn(first, seq.bn1.bn)
        k2, b2 = fold_bn(seq.conv2.weight, seq.bn2)
        km, bm = merge_1x1_kxk(k1, b1, k2, b2, g)
        kernel, bias = kernel + km, bias + bm
        # 1x1 -> avg (dense) or avg (depthwise)
        avg = self.dbb_avg
        k_avg, b_avg = fold_bn(avgpool_kernel(self.out_channels, g, k, dtype=dt, device=dev), avg.avgbn)
        if hasattr(avg, "conv"):
            k1, b1 = fold_bn(avg.conv.weight, avg.bn.bn)
            k_avg, b_avg = merge_1x1_kxk(k1, b1, k_avg, b_avg, g)
        return kernel + k_avg, bias + b_avg

    def main_branch(self) -> ConvBN:
        """The ``k x k`` conv+BN branch."""
        return self.dbb_origin

    def extra_norms(self) -> list[nn.Module]:
        """The BNs that end the three other branches."""
        norms = [self.dbb_avg.avgbn, self.dbb_1x1_kxk.bn2]
        return norms + ([self.dbb_1x1.bn] if self.dbb_1x1 is not None else [])
