"""The angle between a path's current and initial weights, decomposed into per-block statistics.

AngleNAS/ABS judge a path (child model) by θ = arccos(cos(v0, v)), where v concatenates the weights of the path
(fixed layers + the chosen ops) and v0 the same weights at initialisation. Concatenating per path is far too slow
for thousands of paths, but the angle decomposes exactly (``nas.md`` §5). For every *block* b (the weights of one
op, or of the fixed layers) one pass computes d_b = <w0_b, w_b>, a_b = |w0_b|², e_b = |w_b|² in float64, and then

    cos θ_P = (Σ_b m_b d_b + c) / sqrt((Σ_b m_b a_b + c) · (Σ_b m_b e_b + c))

where m_b is how often block b appears in the path's vector and c sums the squared norms of parameter-free
pseudo-weights, identical in v0 and v: an average pool of size k is a constant ``ones(C, k, k) / k²`` kernel
(squared norm C/k²), an identity is nothing (ABS) or ``eye(C)`` (RLNAS, squared norm C), ``none`` is nothing.
Paths are evaluated for many architectures at once: gather the per-(decision, op) statistics with an
``(n, decisions)`` index array, weight by the multiplicities and sum.

Which weights form v is the *angle vector*: :data:`ANGLE_PRESETS` holds the official ones (``rlnas_nb201``,
``abs_nb201``: the same weights, they differ only on disconnected cells; ``rlnas_mobilenet``, ``abs_mobilenet``,
``rlnas_darts``; each equals a port of the official code to 1e-6 rad in
``tests/nas/test_angle.py``), :class:`AngleVector` custom ones; ``cells_only`` drops the fixed layers. Paths without
any searchable weight are degenerate: see :class:`AngleStats`.

The multiplicity defaults to 1 for every decision the path uses (0 for ops on unchosen inputs). A space whose path vector repeats blocks provides
``angle_multiplicity(archs) -> (n, decisions)`` (NAS-Bench-201: an edge counts once per surviving input->output
path of the cell; a row of zeros means every path was dropped by ``none`` and the angle is defined as 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_nd.nas.arch import Decision, decisions, used_mask
from lightning_nd.nas.choice import Choice

IdentityMode = Literal["none", "eye"]


def op_kind(op: nn.Module) -> str | None:
    """``"identity"``, ``"pool"``, ``"none"`` or ``None`` (an op with weights): ``op.angle_kind`` or inferred."""
    kind = getattr(op, "angle_kind", None)
    if kind is not None:
        return kind
    if isinstance(op, nn.Identity):
        return "identity"
    if isinstance(op, (nn.AvgPool2d, nn.MaxPool2d)):
        return "pool"
    return None


def pseudo_norm2(op: nn.Module, channels: int | None, identity: IdentityMode, label: str) -> float:
    """Squared norm of the constant pseudo-weight of a parameter-free op (0 when it contributes nothing).

    Raises:
        ValueError: when the channel count is needed but unknown.
    """
    kind = op_kind(op)
    if kind not in ("pool", "identity") or (kind == "identity" and identity == "none"):
        return 0.0
    channels = getattr(op, "channels", None) or channels
    if not channels:
        raise ValueError(
            f"cannot size the {kind} pseudo-weight of {type(op).__name__} in Choice {label!r}: give the op a "
            "`channels` attribute or run one forward pass before computing statistics"
        )
    if kind == "identity":
        return float(channels)
    k = op.kernel_size if isinstance(op.kernel_size, int) else op.kernel_size[0]
    return float(channels) / float(k * k)


@dataclass(frozen=True)
class AngleVector:
    """Which weights make up a path's angle vector: one row of the table in ``nas.md`` §5.

    The *fixed* part is every tracked parameter outside the ``Choice`` candidates (stem, fixed reduction blocks,
    last conv/BN, classifier); the *op* part is the tracked parameters of the chosen candidates. Conv/linear
    ``.weight`` is always tracked.
    """

    fixed_norm_affine: bool = False  # BN/GroupNorm/LayerNorm weight and bias of the fixed layers
    fixed_bias: bool = False  # conv/linear biases of the fixed layers (NB201: the classifier bias)
    op_norm_affine: int | None = 0  # affine of the first n norm layers of each candidate op (None: all of them)
    op_bias: bool = False  # conv/linear biases inside candidate ops
    identity: IdentityMode = "none"  # identity op: nothing (ABS) or an eye(C) pseudo-weight (RLNAS-MobileNet)
    cells_only: bool = False  # leave the fixed part out: only the chosen ops' weights form the vector
    # class names of candidate ops whose norm *bias* the official vector replaces by the norm weight (so the weight
    # counts twice, the bias never): RLNAS-DARTS ``get_arch_vector`` reads ``op[3].weight`` for a dil conv's bias
    op_norm_bias_as_weight: tuple[str, ...] = ()
    # a path whose every route is cut by ``none``: angle 0 (RLNAS ``weight_angle.py``) or, as ABS's code simply
    # leaves the cut routes out, the angle of the fixed layers alone
    disconnected: Literal["zero", "fixed"] = "zero"


# The official vectors. NB201 (ABS ``exps/angle/weight_angle.py``, RLNAS ``exps/algos/weight_angle.py``, the same
# code): stem conv + stem BN, the reduction blocks' convs and BNs, last BN, classifier weight and bias, and per cell
# path the conv weights of its ops (cells have affine-free BN); pool = 1/9 kernel, skip = nothing, none drops the
# path; a cell whose every path holds ``none`` has angle 0 in RLNAS's copy, the fixed layers' angle in ABS's (which
# only skips the cut paths: ``abs_nb201`` keeps that). MobileNet (ABS ``SPOS/shrinking/shrinking.py``
# ``get_arch_vector``; RLNAS ``evolution_search/test_server.py``): stem conv, the first MBConv's two convs, the last
# 1x1 conv and the classifier weight (no bias, no BN), plus the three convs of each chosen MBConv; RLNAS adds the
# weight and bias of the first two BNs of each chosen op and an ``eye(out, in)`` for identity layers. DARTS (RLNAS
# ``darts_search_space/*/evolution_search/test_server.py``): stem conv + BN, each cell's preprocessing convs + BNs,
# the classifier weight (no bias), and per cell, for each of the 30 input->node routes, every op's convs and BN affine
# (skip: ``eye(C)``, or the FactorizedReduce weights at stride 2; pool: a 1/9 kernel + its BN), routes through an
# unchosen edge dropped; the space's ``angle_multiplicity`` counts the routes. A supernet with ``affine=True`` (as
# RLNAS's) is needed for the BN parts.
ANGLE_PRESETS: dict[str, AngleVector] = {
    "abs_nb201": AngleVector(fixed_norm_affine=True, fixed_bias=True, disconnected="fixed"),
    "rlnas_nb201": AngleVector(fixed_norm_affine=True, fixed_bias=True),
    "abs_mobilenet": AngleVector(),
    "rlnas_mobilenet": AngleVector(op_norm_affine=2, identity="eye"),
    "rlnas_darts": AngleVector(
        fixed_norm_affine=True, op_norm_affine=None, identity="eye", op_norm_bias_as_weight=("DilConv",)
    ),
}


def angle_vector(
    preset: str | AngleVector | None = None,
    include_bn_affine: bool = False,
    include_bias: bool = False,
    identity: IdentityMode = "none",
    cells_only: bool = False,
) -> AngleVector:
    """The :class:`AngleVector` of a preset name, or of the loose flags (every norm affine / every bias).

    Raises:
        ValueError: for an unknown preset or identity mode.
    """
    if identity not in ("none", "eye"):
        raise ValueError(f"identity={identity!r} is not one of ('none', 'eye')")
    if isinstance(preset, str):
        if preset not in ANGLE_PRESETS:
            raise ValueError(f"unknown angle preset {preset!r}; allowed: {sorted(ANGLE_PRESETS)}")
        preset = ANGLE_PRESETS[preset]
    if preset is None:
        preset = AngleVector(
            fixed_norm_affine=include_bn_affine,
            fixed_bias=include_bias,
            op_norm_affine=None if include_bn_affine else 0,
            op_bias=include_bias,
            identity=identity,
        )
    return replace(preset, cells_only=True) if cells_only and not preset.cells_only else preset


_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def tracked_parameters(
    net: nn.Module, include_bn_affine: bool | AngleVector = False, include_bias: bool = False
) -> dict[str, nn.Parameter]:
    """The parameters that make up angle vectors, by name: an :class:`AngleVector`'s selection, or (loose flags)
    conv/linear ``.weight`` + biases if ``include_bias`` + every norm layer's affine if ``include_bn_affine``."""
    vector = include_bn_affine if isinstance(include_bn_affine, AngleVector) else angle_vector(
        None, bool(include_bn_affine), include_bias
    )
    in_op: dict[int, int] = {}  # id(module) -> rank among the norm layers of its candidate op (-1: not a norm)
    for choice in (m for m in net.modules() if isinstance(m, Choice)):
        for op in choice.candidates:
            norms = 0
            for m in op.modules():
                in_op[id(m)] = norms if isinstance(m, _NORMS) else -1
                norms += isinstance(m, _NORMS)
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in net.named_modules():
        fixed = id(module) not in in_op
        names: list[str] = []
        if isinstance(module, (_ConvNd, nn.Linear)):
            names = ["weight"] + (["bias"] if (vector.fixed_bias if fixed else vector.op_bias) else [])
        elif isinstance(module, _NORMS):
            limit = vector.op_norm_affine
            if (vector.fixed_norm_affine if fixed else (limit is None or in_op[id(module)] < limit)):
                names = ["weight", "bias"]
        for name in names:
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter) and id(param) not in seen:
                seen.add(id(param))
                chosen[f"{prefix}.{name}" if prefix else name] = param
    return chosen


@dataclass
class AngleLayout:
    """Which tracked parameter belongs to which block, and the pseudo-weight constants; built once per model."""

    names: list[str]  # tracked parameter names, in computation order
    block_of: np.ndarray  # per name: flat (decision, op) block index, or -1 for the fixed part
    offsets: np.ndarray  # flat index of op 0 of each decision
    const: np.ndarray  # per flat block: summed squared norm of the pseudo-weights over the decision's layers
    decisions: list[Decision]
    multiplicity: Callable[[np.ndarray], np.ndarray] | None  # the space's angle_multiplicity, if any
    cells_only: bool = False  # the fixed part is left out of every path vector
    scale: np.ndarray | None = None  # per name: how often the parameter appears in the vector (default once)
    disconnected: Literal["zero", "fixed"] = "zero"  # angle of a path cut everywhere by none (AngleVector)

    @classmethod
    def build(
        cls,
        net: nn.Module,
        vector: AngleVector | None = None,
        channels: Mapping[str, int] | None = None,
    ) -> AngleLayout:
        """Assign every tracked parameter of ``net`` (selected by ``vector``, default ABS's) to a block.

        Raises:
            ValueError: for a model without ``Choice`` layers.
        """
        vector = vector or AngleVector()
        found = decisions(net)
        if not found:
            raise ValueError(f"{type(net).__name__} has no Choice layers: angles need a supernet")
        sizes = [len(d.names) for d in found]
        offsets = np.cumsum([0] + sizes)[:-1]
        owner: dict[int, int] = {}
        const = np.zeros(sum(sizes), dtype=np.float64)
        for d_idx, d in enumerate(found):
            for layer in d.layers:
                for o, op in enumerate(layer.candidates):
                    flat = int(offsets[d_idx] + o)
                    for p in op.parameters():
                        owner.setdefault(id(p), flat)
                    const[flat] += pseudo_norm2(op, (channels or {}).get(layer.label), vector.identity, layer.label)
        params = tracked_parameters(net, vector)
        scale_of: dict[int, float] = {}
        for d in found:
            for layer in d.layers:
                for op in layer.candidates:
                    if type(op).__name__ not in vector.op_norm_bias_as_weight:
                        continue
                    for norm in (m for m in op.modules() if isinstance(m, _NORMS)):
                        if isinstance(norm.weight, nn.Parameter):
                            scale_of[id(norm.weight)] = 2.0
                        if isinstance(norm.bias, nn.Parameter):
                            scale_of[id(norm.bias)] = 0.0
        names = [n for n in params if scale_of.get(id(params[n]), 1.0) > 0]
        block_of = np.array([owner.get(id(params[n]), -1) for n in names], dtype=np.int64)
        if vector.cells_only:
            names, block_of = [n for n, b in zip(names, block_of) if b >= 0], block_of[block_of >= 0]
        scale = np.array([scale_of.get(id(params[n]), 1.0) for n in names]) if scale_of else None
        multiplicity = getattr(net, "angle_multiplicity", None)
        return cls(
            names, block_of, offsets, const, found, multiplicity if callable(multiplicity) else None, vector.cells_only,
            scale, vector.disconnected,
        )


@torch.no_grad()
def parameter_stats(
    params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], names: Sequence[str]
) -> np.ndarray:
    """``(len(names), 3)`` float64 array of (<w0, w>, |w0|², |w|²) per parameter."""
    rows = []
    for name in names:
        w = params[name].detach().reshape(-1).double()
        w0 = reference[name].detach().reshape(-1).to(w.device).double()
        rows.append(torch.stack((torch.dot(w0, w), torch.dot(w0, w0), torch.dot(w, w))))
    if not rows:
        return np.zeros((0, 3))
    return torch.stack(rows).cpu().numpy()


class AngleStats:
    """Block statistics of one evaluation; every path and op angle follows from them (see the module doc).

    Degenerate paths. A path whose vector holds no searchable weight, i.e. every input->output route is cut by
    ``none`` (*disconnected*) or carries only parameter-free ops (skip, pooling: *weight-free*), is not ranked by
    how its weights moved: its official angle is 0 (disconnected, RLNAS-NB201) or the angle of the fixed
    layers alone (disconnected under ABS-NB201, and weight-free), identical for all such paths, which is what made the quickstart pick a pooling-only cell. With
    ``weight_free="zero"`` (the :class:`~lightning_nd.callbacks.AngleTracker` default) both kinds get angle 0, the
    smallest possible, so they rank last in shrinking and search; ``"official"`` keeps the official values.

    Example::

        layout = AngleLayout.build(net, ANGLE_PRESETS["rlnas_nb201"])
        stats = AngleStats.compute(layout, dict(net.named_parameters()), reference)
        stats.path_angles(np.array([[0, 1, 2, 3, 4, 3], [3, 3, 3, 3, 3, 3]]))
    """

    def __init__(self, layout: AngleLayout, per_param: np.ndarray) -> None:
        self.layout = layout
        if layout.scale is not None and len(per_param):
            per_param = per_param * layout.scale[:, None]
        fixed = layout.block_of < 0
        self.fixed = per_param[fixed].sum(axis=0) if fixed.any() else np.zeros(3)
        self.blocks = np.zeros((len(layout.const), 3), dtype=np.float64)
        np.add.at(self.blocks, layout.block_of[~fixed], per_param[~fixed])
        self.has_weights = self.blocks[:, 1] > 0  # per block: the op holds tracked weights
        # pseudo-weights are identical in both vectors: they add c to the dot product and to both norms
        self._blocks_c = self.blocks + layout.const[:, None]

    @classmethod
    def compute(
        cls, layout: AngleLayout, params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
    ) -> AngleStats:
        return cls(layout, parameter_stats(params, reference, layout.names))

    def _multiplicity(self, archs: np.ndarray) -> np.ndarray:
        if self.layout.multiplicity is None:  # once per used decision: ops on unchosen inputs are not in the path
            return used_mask(self.layout.decisions, archs).astype(np.float64)
        return np.asarray(self.layout.multiplicity(archs), dtype=np.float64)

    def weight_free(self, archs: np.ndarray) -> np.ndarray:
        """Per row of an ``(n, decisions)`` array: no searchable weight in its vector (disconnected or only
        parameter-free ops on its surviving routes)."""
        archs = np.atleast_2d(np.asarray(archs, dtype=np.int64))
        weighted = self.has_weights[archs + self.layout.offsets]
        return ~np.any((self._multiplicity(archs) > 0) & weighted, axis=1)

    def path_cos(self, archs: np.ndarray, weight_free: Literal["zero", "official"] = "zero") -> np.ndarray:
        """cos θ of every row of an ``(n, decisions)`` array (1, i.e. θ = 0, for degenerate rows; see the class doc)."""
        archs = np.atleast_2d(np.asarray(archs, dtype=np.int64))
        gathered = self._blocks_c[archs + self.layout.offsets]  # (n, D, 3)
        mult = self._multiplicity(archs)
        totals = self.fixed + np.einsum("nd,ndk->nk", mult, gathered)
        denom = np.sqrt(totals[:, 1] * totals[:, 2])
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(denom > 0, totals[:, 0] / denom, 1.0)
        cos = np.clip(cos, -1.0, 1.0)
        if self.layout.disconnected == "zero":  # every route dropped by none: 0 in RLNAS's code
            cos[mult.sum(axis=1) == 0] = 1.0
        if weight_free == "zero":
            cos[self.weight_free(archs)] = 1.0
        elif weight_free != "official":
            raise ValueError(f"weight_free={weight_free!r} is not one of ('zero', 'official')")
        return cos

    def path_angles(self, archs: np.ndarray, weight_free: Literal["zero", "official"] = "zero") -> np.ndarray:
        """θ (radians) of every row of an ``(n, decisions)`` array; 0 for degenerate rows (see the class doc)."""
        return np.arccos(self.path_cos(archs, weight_free))

    def op_angles(self) -> list[list[float]]:
        """θ of each op's own tracked weights (summed over the layers of its decision); NaN for ops without weights
        (none, skip, pooling: their pseudo-weights never move, so an op angle would be 0 by construction)."""
        b = self.blocks
        denom = np.sqrt(b[:, 1] * b[:, 2])
        with np.errstate(invalid="ignore", divide="ignore"):
            theta = np.where(denom > 0, np.arccos(np.clip(b[:, 0] / denom, -1.0, 1.0)), np.nan)
        ends = list(self.layout.offsets[1:]) + [len(theta)]
        return [theta[s:e].tolist() for s, e in zip(self.layout.offsets, ends)]
