"""``ImplicitFPN``: the feature pyramid as an equilibrium, a drop-in for torchvision's ``FeaturePyramidNetwork``.

i-FPN (Wang, Zhang, Sun, "Implicit Feature Pyramid Network for Object Detection", arXiv 2012.13563) replaces the
stacked top-down (and bottom-up) passes of an FPN by their fixed point: the pyramid ``P* = G(P*, B)`` where ``B``
are the backbone features projected by lateral 1x1 convolutions (the *injection*) and ``G`` is one cross-scale
fusion block whose weights are shared by every iteration. At the fixed point every level has exchanged
information with every other level as often as it takes to stop changing, with the parameters of about one
FPN layer. No official code exists; this module follows the paper's abstract and the DEQ recipe of the
reference (MDEQ-style GroupNorm inside the cell, Anderson forward solver, exact implicit backward):

    u_l   = P_l + B_l                                          (injection)
    t_L   = u_L,  t_l = u_l + up(t_{l+1})                      (top-down, nearest upsampling as in FPN)
    b_1   = t_1,  b_l = t_l + down(b_{l-1})                    (bottom-up, adaptive average pooling)
    G(P)_l = GroupNorm_l(conv3x3_l(relu(b_l)))                 (per-level transform; the norm keeps the map tame)

The cell (:class:`PyramidFusionCell`) is solved by :class:`~lightning_nd.implicit.DEQ`, so the solver, the backward
mode (exact implicit differentiation by default, phantom gradients, an unrolled warm-up mode), the Jacobian
regularisation (scheduled by ``DetectionModule(jac_reg=JacobianSchedule(...))``) and the statistics of the last solve
(``last_stats``, read by ``DEQMonitor``) are those of any DEQ. The solver defaults (:data:`IFPN_DEQ_DEFAULTS`:
Anderson at relative tolerance 5e-2, caps 12 / 12) were chosen for speed from measured training runs (issue 15). Like torchvision's FPN,
``extra_blocks`` (e.g. ``LastLevelP6P7``) runs on the equilibrium pyramid, and the output is an ``OrderedDict``
with the input's names (plus the extra blocks' names) in the same order and with the same shapes.

Parameters: lateral 1x1 convolutions (as in FPN) plus one 3x3 convolution and one GroupNorm per level (FPN has one
3x3 output convolution per level), so the neck has the parameter count of an FPN plus the norms.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from lightning_nd.implicit.deq import DEQ, DEQConfig, DEQStats

IFPN_DEQ_DEFAULTS: dict[str, Any] = {
    "f_solver": "anderson",
    "f_max_iter": 12,
    "f_tol": 5e-2,
    "f_stop_mode": "rel",
    "b_solver": "anderson",
    "b_max_iter": 12,
    "b_tol": 5e-2,
    "b_stop_mode": "rel",
}
"""Solver defaults of the implicit FPN: Anderson forward and backward, relative tolerance 5e-2, at most 12 evaluations
each (the residuals of a whole pyramid are large in absolute terms, so the stop rule is relative, as locuslab's
CIFAR configs use).

Chosen from measured runs of ``benchmarks/ifpn_shapes.py`` (RetinaNet on 96 px shapes, 600 steps, all settings
trained in lockstep from the same weights, 5 seeds; ``benchmarks/results/ifpn_shapes.md``): 5.3 / 4.9 evaluations
per step and 1.17x (1.13-1.19x) the FPN's training step at the previous 1e-2, 4.4 / 4.2 and 1.14x at 3e-2, 4.1 / 3.7
and 1.13x (1.10-1.14x) at 5e-2 (before issue 15, 20 / 20 at 1e-3: about 7 / 7 and 1.24x). mAP at that budget moves by
several points from seed to seed and between settings of one seed: 0.193 (0.147-0.293) at 5e-2 against 0.188
(0.149-0.227) at 1e-2, +0.005 (-0.052 to +0.066) per seed, no loss within a spread of about +-0.05. The caps of 12
bind only in the first steps of training (an untrained cell); they are a bound, not the usual cost. Tighter settings
stay one argument away (``ImplicitFPN(..., f_tol=1e-3, b_tol=1e-3)``); ``DetectionModule(jac_reg=...)`` adds
Jacobian regularisation, which lowers the evaluations further (3.4 / 3.3 on shapes, with no measurable saving of
step time there and 0.027 lower mAP on average)."""


def merge_deq_options(
    defaults: dict[str, Any], deq: DEQConfig | dict[str, Any] | None = None, **options: Any
) -> dict[str, Any]:
    """Model-specific DEQ defaults, overridden by what the user gave, by one rule for a dict and a ``DEQConfig``.

    A dict gives its keys; a ``DEQConfig`` gives the fields where it differs from ``DEQConfig()`` (a dataclass does
    not record which fields were passed, so a field left at, or set to, the generic default keeps the model's
    default: pass such a value as a dict entry or keyword). Keywords win over both.

    Raises:
        ValueError: for unknown option names (listing the allowed ones).

    Example::

        merge_deq_options(IFPN_DEQ_DEFAULTS, DEQConfig(f_solver="broyden"))["f_max_iter"]   # the i-FPN's cap
    """
    if isinstance(deq, DEQConfig):
        generic = DEQConfig()
        given = {f.name: getattr(deq, f.name) for f in dataclasses.fields(deq)
                 if getattr(deq, f.name) != getattr(generic, f.name)}
    else:
        given = dict(deq or {})
    return dataclasses.asdict(DEQConfig.build({**defaults, **given}, **options))


class PyramidFusionCell(nn.Module):
    """One cross-scale fusion step ``G(P, B)`` of the implicit FPN: top-down, bottom-up, conv + GroupNorm per level.

    Called as ``cell(z, x)`` with ``z`` (the pyramid state) and ``x`` (the injection) tuples of ``(B, C, H_l, W_l)``
    tensors, highest resolution first; returns a tuple of the same shapes.

    Args:
        num_levels: pyramid levels L.
        channels: channels C of every level.
        num_groups: GroupNorm groups (must divide ``channels``).

    Raises:
        ValueError: for ``num_levels < 1`` or groups that do not divide the channels.

    Example::

        cell = PyramidFusionCell(num_levels=3, channels=64)
        p_next = cell(p, b)   # p, b: tuples of (B, 64, H_l, W_l), highest resolution first
    """

    def __init__(self, num_levels: int, channels: int, num_groups: int = 8) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels={num_levels} must be >= 1")
        if num_groups < 1 or channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide channels={channels}")
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(num_levels))
        self.norms = nn.ModuleList(nn.GroupNorm(num_groups, channels) for _ in range(num_levels))

    def forward(self, z: tuple[torch.Tensor, ...], x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        u = [zl + xl for zl, xl in zip(z, x)]
        td = list(u)
        for level in range(len(u) - 2, -1, -1):
            td[level] = u[level] + F.interpolate(td[level + 1], size=u[level].shape[-2:], mode="nearest")
        fused = [td[0]]
        for level in range(1, len(u)):
            fused.append(td[level] + F.adaptive_avg_pool2d(fused[-1], td[level].shape[-2:]))
        return tuple(norm(conv(F.relu(f))) for f, conv, norm in zip(fused, self.convs, self.norms))


class ImplicitFPN(nn.Module):
    """Implicit feature pyramid network: torchvision's ``FeaturePyramidNetwork`` interface, equilibrium inside.

    Replace the neck of a torchvision detector with it, e.g. ``model.backbone.fpn = ImplicitFPN(in_channels_list,
    256, extra_blocks=LastLevelP6P7(256, 256))`` for RetinaNet / FCOS.

    Args:
        in_channels_list: channels of each input feature map, highest resolution first.
        out_channels: channels of every output level.
        extra_blocks: a torchvision ``ExtraFPNBlock`` applied to the equilibrium pyramid (``LastLevelMaxPool``,
            ``LastLevelP6P7``), exactly as in ``FeaturePyramidNetwork``.
        norm_layer: normalisation of the lateral 1x1 projections (as in ``FeaturePyramidNetwork``); default none.
        num_groups: GroupNorm groups inside the fusion cell (must divide ``out_channels``).
        deq: options of the :class:`~lightning_nd.implicit.DEQ` (solver, tolerances, backward mode, ...), a dict or
            a ``DEQConfig``, merged over :data:`IFPN_DEQ_DEFAULTS` by one rule (:func:`merge_deq_options`): a dict
            sets its keys, a ``DEQConfig`` the fields where it differs from ``DEQConfig()``.
        **deq_options: the same options as keywords (they win over ``deq``).

    Attributes:
        inner_blocks: the lateral 1x1 projections (torchvision's name).
        cell: the :class:`PyramidFusionCell` solved to its fixed point.
        deq: the :class:`~lightning_nd.implicit.DEQ` around the cell.

    Raises:
        ValueError: for an empty ``in_channels_list``, non-positive channels, groups that do not divide
            ``out_channels``, an ``extra_blocks`` that is not an ``ExtraFPNBlock``, unknown or invalid DEQ options,
            and at call time for an input with a different number of levels.

    Example::

        fpn = ImplicitFPN([128, 256, 512], 64, extra_blocks=LastLevelP6P7(64, 64), f_max_iter=30)
        out = fpn(OrderedDict(c3=x3, c4=x4, c5=x5))    # OrderedDict c3, c4, c5, p6, p7 with 64 channels
        print(fpn.last_stats.forward.nfe)
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        num_groups: int = 8,
        deq: DEQConfig | dict[str, Any] | None = None,
        **deq_options: Any,
    ) -> None:
        super().__init__()
        in_channels_list = list(in_channels_list)
        if not in_channels_list or any(c <= 0 for c in in_channels_list):
            raise ValueError(f"in_channels_list={in_channels_list} must be a non-empty list of positive channels")
        if out_channels <= 0:
            raise ValueError(f"out_channels={out_channels} must be > 0")
        if extra_blocks is not None and not isinstance(extra_blocks, ExtraFPNBlock):
            raise ValueError(f"extra_blocks must be a torchvision ExtraFPNBlock or None, got {type(extra_blocks).__name__}")
        self.inner_blocks = nn.ModuleList()
        for c in in_channels_list:
            layers: list[nn.Module] = [nn.Conv2d(c, out_channels, 1, bias=norm_layer is None)]
            if norm_layer is not None:
                layers.append(norm_layer(out_channels))
            self.inner_blocks.append(nn.Sequential(*layers))
        for m in self.inner_blocks.modules():
            if isinstance(m, nn.Conv2d):  # torchvision FPN's initialisation of its convolutions
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        self.cell = PyramidFusionCell(len(in_channels_list), out_channels, num_groups)
        self.deq = DEQ(self.cell, merge_deq_options(IFPN_DEQ_DEFAULTS, deq, **deq_options))
        self.extra_blocks = extra_blocks
        self.in_channels_list, self.out_channels = in_channels_list, out_channels

    @property
    def last_stats(self) -> DEQStats | None:
        """Statistics of the last solve (forward at once, backward after ``backward()``), as ``DEQ.last_stats``."""
        return self.deq.last_stats

    def injection(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The lateral projections ``B_l`` of the backbone features (the DEQ's input)."""
        if len(x) != len(self.inner_blocks):
            raise ValueError(f"ImplicitFPN was built for {len(self.inner_blocks)} levels, got {len(x)}: {list(x)}")
        return tuple(block(f) for block, f in zip(self.inner_blocks, x.values()))

    def forward(self, x: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Compute the equilibrium pyramid for ``x`` (an ordered dict of feature maps, highest resolution first).

        Returns:
            An ``OrderedDict`` with the names of ``x`` (and of the extra blocks), ``out_channels`` channels each.
        """
        names = list(x.keys())
        features = list(x.values())
        pyramid = list(self.deq(self.injection(x)))
        if self.extra_blocks is not None:
            pyramid, names = self.extra_blocks(pyramid, features, names)
        return OrderedDict(zip(names, pyramid))
