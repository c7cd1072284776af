"""``ImplicitFPN``: the feature pyramid as an equilibrium, a drop-in for torchvision's ``FeaturePyramidNetwork``.

**From the paper** (Wang, Zhang, Sun, "Implicit Feature Pyramid Network for Object Detection", arXiv 2012.13563; no
official code is public, and only the abstract, the introduction and third-party summaries could be read): the neck
is the fixed point of one weight-shared cross-scale transformation instead of a stack of weight-independent FPN
blocks; the backbone features enter as an injection ``B`` in a "residual-like iteration" ``P* = G(P* + B)``; a
feature solver (the DEQ machinery) finds ``P*`` and the gradient is the implicit one. The form of ``G``, the solver,
its iteration counts and the training schedule could not be verified.

**This project's choices** (issue 22; measured by ``benchmarks/ifpn_shapes.py``), in :class:`PyramidFusionCell`:

    u_l   = P_l + GN0(B_l)                                     injection (the paper's P + B), normalised, no affine
    m_l   = u_l + up(u_{l+1}) + down(u_{l-1})                  learned resampling between adjacent levels only
    G(P)_l = GN1(relu(u_l + GN_l(conv3x3(relu(m_l)))))         MDEQ-style residual block, output norm without affine

- a residual cell after MDEQ (reference deq.md, section 7): the state has an identity path, and the injection is
  normalised, so neither the injection's scale nor the lateral projections can drown the state out (the previous
  cell ``GN(conv(relu(P + B)))`` was scale-invariant in ``P + B``: a growing ``B`` switched the recurrence off, and
  the trained i-FPN was a one-layer neck);
- MDEQ's learned resampling (stride-2 3x3 convolution down, 1x1 convolution + nearest upsampling up), between
  adjacent levels only, so one application fuses neighbours and the equilibrium fuses the whole pyramid;
- the convolutions are shared by all levels (as RetinaNet's head is), so the neck has about one FPN's parameters;
- every level the detector uses is inside the equilibrium: ``extra_blocks`` (e.g. ``LastLevelP6P7``) builds the
  injections of the extra levels from the lateral projections (``extra_inside=True``, the default), instead of
  running on the equilibrium's output as in torchvision's FPN;
- Anderson forward and backward solves at relative tolerance 5e-2, caps 12 / 12 (:data:`IFPN_DEQ_DEFAULTS`).

The cell is solved by :class:`~lightning_nd.implicit.DEQ`, so the solver, the backward mode (exact implicit
differentiation by default, phantom gradients, an unrolled mode: ``mode="unrolled", unroll_layers=1`` is the same
cell applied once, the explicit control), the Jacobian regularisation (``DetectionModule(jac_reg=...)``) and the
statistics of the last solve (``last_stats``, read by ``DEQMonitor``) are those of any DEQ;
:mod:`lightning_nd.implicit.diagnostics` tells whether the trained neck uses its equilibrium. The output is an
``OrderedDict`` with the input's names (plus the extra blocks' names) in the same order and with the same shapes as
torchvision's FPN.
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

The tolerance was chosen for speed with the previous cell (issue 15: 5e-2 against 1e-2 and 3e-2, 600 steps,
5 seeds, no measurable mAP difference, 1.13x instead of 1.17x the FPN's training step) and kept for the residual
cell of issue 22, which at initialisation contracts by about 0.85 and reaches it in 5-6 evaluations; the caps bound
the cost of an untrained cell. Tighter settings stay one argument away (``ImplicitFPN(..., f_tol=1e-3,
b_tol=1e-3)``); the measured numbers are in ``benchmarks/results/ifpn_shapes.md``."""


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


def _resize(t: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return t if t.shape[-2:] == size else F.interpolate(t, size=size, mode="nearest")


class PyramidFusionCell(nn.Module):
    """One residual cross-scale step ``G(P + B)`` of the implicit FPN (MDEQ-style, every level inside).

    Called as ``cell(z, x)`` with ``z`` (the pyramid state) and ``x`` (the injection) tuples of ``(B, C, H_l, W_l)``
    tensors, highest resolution first; returns a tuple of the same shapes. Per level ``l``::

        u_l = z_l + GN0(x_l)                                        injection, normalised (no affine)
        m_l = u_l + up(u_{l+1}) + down(u_{l-1})                     learned resampling, adjacent levels only
        y_l = GN_l(conv3x3(relu(m_l)))                              residual branch
        G_l = GN1(relu(u_l + y_l))                                  output norm (no affine)

    ``up`` is a 1x1 convolution followed by nearest upsampling and ``down`` a stride-2 3x3 convolution (MDEQ's
    resampling); ``up``, ``down`` and ``conv3x3`` are shared by all levels (as RetinaNet's head is), the GroupNorm
    of the branch is per level. Why this form:

    - the state enters through the identity path ``u_l`` and the injection is normalised, so neither the
      injection's scale nor the lateral projections can drown the state out: scaling ``x`` leaves ``G`` unchanged,
      and ``G`` always depends on ``z`` (the previous cell, ``GN(conv(relu(z + x)))``, was scale-invariant in
      ``z + x`` and let a growing injection switch the recurrence off);
    - one application only exchanges information between adjacent levels, so a level hears the others through
      the iterations: the equilibrium is where the whole pyramid has been fused, one application is not;
    - the output norm has no affine, so the state keeps the injection's scale and cannot be scaled to zero.

    Args:
        num_levels: pyramid levels L.
        channels: channels C of every level.
        num_groups: GroupNorm groups (must divide ``channels``).

    Raises:
        ValueError: for ``num_levels < 1`` or groups that do not divide the channels.

    Example::

        cell = PyramidFusionCell(num_levels=5, channels=64)
        p_next = cell(p, b)   # p, b: tuples of (B, 64, H_l, W_l), highest resolution first
    """

    def __init__(self, num_levels: int, channels: int, num_groups: int = 8) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels={num_levels} must be >= 1")
        if num_groups < 1 or channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide channels={channels}")
        self.num_levels = num_levels
        self.inject_norm = nn.GroupNorm(num_groups, channels, affine=False)
        self.up = nn.Conv2d(channels, channels, 1, bias=False)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norms = nn.ModuleList(nn.GroupNorm(num_groups, channels) for _ in range(num_levels))
        self.out_norm = nn.GroupNorm(num_groups, channels, affine=False)

    def forward(self, z: tuple[torch.Tensor, ...], x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(z) != self.num_levels or len(x) != self.num_levels:
            raise ValueError(f"PyramidFusionCell has {self.num_levels} levels, got a state of {len(z)} and an "
                             f"injection of {len(x)}")
        u = [zl + self.inject_norm(xl) for zl, xl in zip(z, x)]
        out = []
        for level, ul in enumerate(u):
            m = ul
            if level + 1 < len(u):
                m = m + _resize(self.up(u[level + 1]), ul.shape[-2:])
            if level > 0:
                m = m + _resize(self.down(u[level - 1]), ul.shape[-2:])
            y = self.norms[level](self.conv(F.relu(m)))
            out.append(self.out_norm(F.relu(ul + y)))
        return tuple(out)


class ImplicitFPN(nn.Module):
    """Implicit feature pyramid network: torchvision's ``FeaturePyramidNetwork`` interface, equilibrium inside.

    Replace the neck of a torchvision detector with it, e.g. ``model.backbone.fpn = ImplicitFPN(in_channels_list,
    256, extra_blocks=LastLevelP6P7(256, 256))`` for RetinaNet / FCOS.

    Args:
        in_channels_list: channels of each input feature map, highest resolution first.
        out_channels: channels of every output level.
        extra_blocks: a torchvision ``ExtraFPNBlock`` (``LastLevelMaxPool``, ``LastLevelP6P7``) that adds the
            coarser levels, with the names and shapes of ``FeaturePyramidNetwork``'s.
        extra_inside: the extra levels are part of the equilibrium: ``extra_blocks`` runs on the lateral
            projections and makes their injections (default). ``False``: it runs on the equilibrium's output, as in
            torchvision's FPN.
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
            ``out_channels``, an ``extra_blocks`` that is not an ``ExtraFPNBlock``, a non-bool ``extra_inside``,
            unknown or invalid DEQ options, and at call time for an input with a different number of levels.

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
        extra_inside: bool = True,
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
        if not isinstance(extra_inside, bool):
            raise ValueError(f"extra_inside={extra_inside!r} must be a bool")
        self.extra_blocks = extra_blocks
        self.extra_inside = extra_inside
        self.in_channels_list, self.out_channels = in_channels_list, out_channels
        self.num_extra_levels = self._count_extra_levels() if extra_inside else 0
        self.cell = PyramidFusionCell(len(in_channels_list) + self.num_extra_levels, out_channels, num_groups)
        self.deq = DEQ(self.cell, merge_deq_options(IFPN_DEQ_DEFAULTS, deq, **deq_options))

    def _count_extra_levels(self) -> int:
        """How many levels ``extra_blocks`` adds (run once on small zero maps; any ``ExtraFPNBlock`` works)."""
        if self.extra_blocks is None:
            return 0
        sizes = [64 // 2**k for k in range(len(self.in_channels_list))]
        feats = [torch.zeros(1, c, s, s) for c, s in zip(self.in_channels_list, sizes)]
        maps = [torch.zeros(1, self.out_channels, s, s) for s in sizes]
        names = [str(k) for k in range(len(maps))]
        with torch.no_grad():  # torchvision's blocks extend the lists in place: count before
            out, _ = self.extra_blocks(list(maps), feats, list(names))
        return len(out) - len(maps)

    @property
    def last_stats(self) -> DEQStats | None:
        """Statistics of the last solve (forward at once, backward after ``backward()``), as ``DEQ.last_stats``."""
        return self.deq.last_stats

    def injection(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The injections ``B_l`` of the DEQ: the lateral projections of the backbone features, followed (with
        ``extra_inside``) by the extra levels that ``extra_blocks`` builds from them."""
        return self._injection(x)[0]

    def _injection(self, x: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], list[str]]:
        if len(x) != len(self.inner_blocks):
            raise ValueError(f"ImplicitFPN was built for {len(self.inner_blocks)} levels, got {len(x)}: {list(x)}")
        names = list(x.keys())
        b = [block(f) for block, f in zip(self.inner_blocks, x.values())]
        if self.extra_blocks is not None and self.extra_inside:
            b, names = self.extra_blocks(b, list(x.values()), names)
        return tuple(b), names

    def forward(self, x: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Compute the equilibrium pyramid for ``x`` (an ordered dict of feature maps, highest resolution first).

        Returns:
            An ``OrderedDict`` with the names of ``x`` (and of the extra blocks), ``out_channels`` channels each.
        """
        b, names = self._injection(x)
        pyramid = list(self.deq(b))
        if self.extra_blocks is not None and not self.extra_inside:
            pyramid, names = self.extra_blocks(pyramid, list(x.values()), names)
        return OrderedDict(zip(names, pyramid))
