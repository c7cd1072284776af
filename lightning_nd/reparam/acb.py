"""Asymmetric Convolution Block (ACNet, Ding et al., ICCV 2019): ``k x k`` + ``1 x k`` + ``k x 1``, each with BN.

The two 1-D kernels strengthen the kernel skeleton during training; at inference they are added to the centre row
and column of the square kernel. Their paddings are aligned with the square conv's: for square padding ``p`` and
centre offset ``c = p - dilation * (k // 2)``, the ``k x 1`` conv pads ``(p, c)`` and the ``1 x k`` conv ``(c, p)``. When
``c < 0`` (e.g. ``k=3, p=0``) the input is cropped by ``-c`` instead (the fix of DingXiaoH/ACNet#3).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_nd.reparam.base import ActLayer, ConvBN, ReparamBlock, check_geometry
from lightning_nd.reparam.fusion import center_kernel


class ACBlock(ReparamBlock):
    """``act(BN(conv_kxk(x)) + BN(conv_kx1(x)) + BN(conv_1xk(x)))``; no nonlinearity inside the block.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size >= 3.
        stride: stride of all three branches.
        padding: padding of the square conv; any value >= 0 (default ``dilation * (kernel_size // 2)``).
        groups: groups of all three convs.
        dilation: dilation of the square conv (the 1-D convs dilate along their long side).
        gamma_init: initial value of the three BN gammas (the ACNet README suggests 1/3); ``None`` keeps 1.
        act_layer: activation after the sum; ``None`` (default) for none.
        deploy: build the fused form directly.

    Raises:
        ValueError: for an even kernel or a 1x1 kernel, groups that do not divide the channels, or a negative padding.

    Example::

        block = ACBlock(16, 32, 3, stride=2)
        block.eval().reparameterize()   # one 3x3 conv with bias
    """

    _branch_names = ("square", "ver", "hor")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        gamma_init: float | None = None,
        act_layer: ActLayer | None = None,
        deploy: bool = False,
    ) -> None:
        check_geometry("ACBlock", in_channels, out_channels, kernel_size, stride, groups, dilation)
        if kernel_size < 3:
            raise ValueError(f"ACBlock: kernel_size={kernel_size} must be >= 3 (a 1x1 kernel has no skeleton)")
        padding = dilation * (kernel_size // 2) if padding is None else padding
        if padding < 0:
            raise ValueError(f"ACBlock: padding={padding} must be >= 0")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, act_layer, deploy)
        if deploy:
            return
        offset = padding - dilation * (kernel_size // 2)
        self.crop = max(0, -offset)
        side = max(0, offset)
        self.square = ConvBN(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.ver = ConvBN(in_channels, out_channels, (kernel_size, 1), stride, (padding, side), (dilation, 1), groups)
        self.hor = ConvBN(in_channels, out_channels, (1, kernel_size), stride, (side, padding), (1, dilation), groups)
        if gamma_init is not None:
            for branch in (self.square, self.ver, self.hor):
                nn.init.constant_(branch.bn.weight, gamma_init)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self.square(x)
        c = self.crop
        if c > 0:
            return out + self.ver(x[:, :, :, c:-c]) + self.hor(x[:, :, c:-c, :])
        return out + self.ver(x) + self.hor(x)

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = self.square.kernel_bias()
        for branch in (self.ver, self.hor):
            k, b = branch.kernel_bias()
            kernel, bias = kernel + center_kernel(k, self.kernel_size), bias + b
        return kernel, bias

    def main_branch(self) -> ConvBN:
        """The square conv+BN branch."""
        return self.square

    def extra_norms(self) -> list[nn.Module]:
        """The BNs of the two asymmetric branches."""
        return [self.ver.bn, self.hor.bn]
