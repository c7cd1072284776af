"""The shared skeleton of every re-parameterizable block: train-time branches, one deploy conv, timm's protocol.

A block is built in its training form (several branches summed, then an optional activation) or, with
``deploy=True``, directly in its deploy form (one ``reparam_conv`` with bias and the same geometry). ``reparameterize()``
turns the training form into the deploy form *in place*: it computes the equivalent kernel and bias in float32
(:meth:`ReparamBlock.kernel_bias`), casts them to the weights' dtype, deletes the branches and sets ``deploy``. Calling
it again does nothing, so a model can be converted by any number of tools. ``switch_to_deploy()`` is the same method
under the name of the official RepVGG/ACNet/DBB code.

Example::

    block = RepVGGBlock(16, 16, 3).eval()
    y = block(x)
    block.reparameterize()
    torch.testing.assert_close(block(x), y)
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from lightning_nd.reparam.fusion import fold_bn, memory_format_of

ActLayer = Callable[[], nn.Module]


class ConvBN(nn.Module):
    """``Conv2d`` (no bias) followed by ``BatchNorm2d``; keys ``conv.*`` and ``bn.*`` like timm's ``ConvNormAct``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: of the convolution
            (``kernel_size`` and ``padding`` may be ``(h, w)`` pairs).

    Raises:
        ValueError: from ``nn.Conv2d`` for invalid sizes (e.g. groups that do not divide the channels).

    Example::

        branch = ConvBN(16, 32, 3, stride=2, padding=1)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the branch with BN folded, float32."""
        return fold_bn(self.conv.weight, self.bn, self.conv.bias)


def check_geometry(
    block: str, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int, dilation: int = 1
) -> None:
    """Validate what every block shares: positive sizes, an odd kernel, groups dividing both channel counts.

    Raises:
        ValueError: naming the bad value and what is allowed.
    """
    for name, value in (
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("kernel_size", kernel_size),
        ("stride", stride),
        ("groups", groups),
        ("dilation", dilation),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{block}: {name}={value!r} must be a positive int")
    if kernel_size % 2 == 0:
        raise ValueError(f"{block}: kernel_size={kernel_size} is even; re-parameterization needs an odd kernel (1, 3, 5, ...)")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{block}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
        )


class ReparamBlock(nn.Module, metaclass=ABCMeta):
    """Base class: ``forward`` runs the branches (or ``reparam_conv``), then ``act``; subclasses define the branches.

    Subclasses implement :meth:`forward_branches` and :meth:`kernel_bias` and list their branch attributes in
    ``_branch_names`` so that :meth:`reparameterize` can delete them.

    Raises:
        ValueError: from subclasses, on an invalid geometry.

    Example::

        class Plain(ReparamBlock):            # a block with a single k x k conv+BN branch
            _branch_names = ("branch",)

            def __init__(self, c: int, deploy: bool = False):
                super().__init__(c, c, 3, 1, 1, 1, 1, None, deploy)
                if not deploy:
                    self.branch = ConvBN(c, c, 3, padding=1)

            def forward_branches(self, x):
                return self.branch(x)

            def kernel_bias(self):
                return self.branch.kernel_bias()
    """

    _branch_names: tuple[str, ...] = ()

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        groups: int,
        act_layer: ActLayer | None,
        deploy: bool,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.deploy = deploy
        self.reparam_conv: nn.Conv2d | None = None
        if deploy:
            self.reparam_conv = self._deploy_conv()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def _deploy_conv(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=True,
            device=device,
            dtype=dtype,
        )

    @abstractmethod
    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of the training-time branches (before ``act``)."""

    @abstractmethod
    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent ``k x k`` kernel and bias of all branches, in float32 (float64 for a float64 block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        return self.act(self.forward_branches(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one convolution, in place; a no-op on a block already in deploy form."""
        if self.reparam_conv is not None:
            return
        kernel, bias = self.kernel_bias()
        ref = next(p for p in self.parameters())
        conv = self._deploy_conv(device=ref.device, dtype=ref.dtype)
        kernel_ref = next((p for p in self.parameters() if p.dim() == 4), ref)
        conv.to(memory_format=memory_format_of(kernel_ref))  # a channels-last block gives a channels-last deploy conv
        conv.weight.copy_(kernel.to(ref.dtype))
        conv.bias.copy_(bias.to(ref.dtype))
        conv.train(self.training)
        for name in self._branch_names:
            if hasattr(self, name):
                delattr(self, name)
        self.reparam_conv = conv
        self.deploy = True

    def switch_to_deploy(self) -> None:
        """Alias of :meth:`reparameterize` (the official RepVGG / ACNet / DBB name)."""
        self.reparameterize()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, deploy={self.deploy}"
        )
