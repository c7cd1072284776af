"""RepVGG block (Ding et al., CVPR 2021): ``k x k`` conv+BN + ``1x1`` conv+BN + identity BN, summed, then ReLU.

At inference the three branches are one ``k x k`` convolution: the ``1x1`` kernel sits at the centre of the ``k x k``
kernel and the identity is a centred one on each channel's own input (grouped and depthwise convolutions included).
The identity branch exists only when ``in_channels == out_channels`` and ``stride == 1``.

Attribute names follow timm's ``byobnet.RepVggBlock`` (``identity``, ``conv_kxk.conv/bn``, ``conv_1x1.conv/bn``,
``reparam_conv``), so a timm RepVGG block's state dict loads into this one and back.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_nd.reparam.base import ActLayer, ConvBN, ReparamBlock, check_geometry
from lightning_nd.reparam.fusion import center_kernel, fold_bn, identity_kernel, work_dtype


class RepVGGBlock(ReparamBlock):
    """``act(BN(conv_kxk(x)) + BN(conv_1x1(x)) + BN(x))``, fused to ``act(reparam_conv(x))`` by :meth:`reparameterize`.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (3 in the paper); 1 gives a block without the ``1x1`` branch.
        stride: stride of the ``k x k`` and ``1x1`` branches.
        padding: must be ``dilation * (kernel_size // 2)`` (the default), so the branches align.
        groups: groups of both convolutions (``groups == channels`` is depthwise).
        dilation: dilation of the ``k x k`` conv.
        use_identity: add the identity BN branch; ``None`` adds it when ``in == out`` and ``stride == 1``.
        act_layer: activation after the sum (default ``nn.ReLU``); ``None`` for none (used by ``convert_model``).
        deploy: build the fused form directly (one conv with bias), e.g. to load a deploy state dict.

    Raises:
        ValueError: for an even kernel, groups that do not divide the channels, a padding other than
            ``dilation * (kernel_size // 2)``, or ``use_identity=True`` with ``stride != 1`` or ``in != out``.

    Example::

        block = RepVGGBlock(32, 32, 3).eval()
        y = block(torch.randn(2, 32, 16, 16))
        block.reparameterize()          # one 3x3 conv + ReLU, same outputs
    """

    _branch_names = ("identity", "conv_kxk", "conv_1x1")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        use_identity: bool | None = None,
        act_layer: ActLayer | None = nn.ReLU,
        deploy: bool = False,
    ) -> None:
        check_geometry("RepVGGBlock", in_channels, out_channels, kernel_size, stride, groups, dilation)
        centre = dilation * (kernel_size // 2)
        padding = centre if padding is None else padding
        if padding != centre:
            raise ValueError(
                f"RepVGGBlock: padding={padding} must be dilation * (kernel_size // 2) = {centre} so that the 1x1 and "
                "identity branches align with the kernel centre"
            )
        identity_ok = in_channels == out_channels and stride == 1
        if use_identity and not identity_ok:
            raise ValueError(
                f"RepVGGBlock: use_identity=True needs in_channels == out_channels and stride == 1, got "
                f"in_channels={in_channels}, out_channels={out_channels}, stride={stride}"
            )
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, act_layer, deploy)
        if deploy:
            return
        use_identity = identity_ok if use_identity is None else use_identity
        self.identity = nn.BatchNorm2d(out_channels) if use_identity else None
        self.conv_kxk = ConvBN(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.conv_1x1 = ConvBN(in_channels, out_channels, 1, stride, 0, 1, groups) if kernel_size > 1 else None

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_kxk(x)
        if self.conv_1x1 is not None:
            out = out + self.conv_1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return out

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = self.conv_kxk.kernel_bias()
        k = self.kernel_size
        if self.conv_1x1 is not None:
            k1, b1 = self.conv_1x1.kernel_bias()
            kernel, bias = kernel + center_kernel(k1, k), bias + b1
        if self.identity is not None:
            ident = identity_kernel(
                self.in_channels, self.groups, k, dtype=work_dtype(kernel.dtype), device=kernel.device
            )
            ki, bi = fold_bn(ident, self.identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    def main_branch(self) -> ConvBN:
        """The ``k x k`` conv+BN branch (what ``convert_model`` loads a plain conv+BN into)."""
        return self.conv_kxk

    def extra_norms(self) -> list[nn.Module]:
        """The BNs that end the other branches: zeroing their affine parameters switches those branches off."""
        return [m for m in (self.identity, self.conv_1x1.bn if self.conv_1x1 is not None else None) if m is not None]
