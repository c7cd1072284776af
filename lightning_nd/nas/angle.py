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

The multiplicity defaults to 1 for every decision. A space whose path vector repeats blocks provides
``angle_multiplicity(archs) -> (n, decisions)`` (NAS-Bench-201: an edge counts once per surviving input->output
path of the cell; a row of zeros means every path was dropped by ``none`` and the angle is defined as 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_nd.nas.arch import Decision, decisions

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


def tracked_parameters(
    net: nn.Module, include_bn_affine: bool = False, include_bias: bool = False
) -> dict[str, nn.Parameter]:
    """The parameters that make up angle vectors: conv/linear ``.weight`` (+ biases, + norm-layer affine)."""
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in net.named_modules():
        names: list[str] = []
        if isinstance(module, (_ConvNd, nn.Linear)):
            names = ["weight"] + (["bias"] if include_bias else [])
        elif include_bn_affine and isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)):
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

    @classmethod
    def build(
        cls,
        net: nn.Module,
        include_bn_affine: bool = False,
        include_bias: bool = False,
        identity: IdentityMode = "none",
        channels: Mapping[str, int] | None = None,
    ) -> AngleLayout:
        """Assign every tracked parameter of ``net`` to a block.

        Raises:
            ValueError: for a model without ``Choice`` layers or an unknown ``identity`` mode.
        """
        if identity not in ("none", "eye"):
            raise ValueError(f"identity={identity!r} is not one of ('none', 'eye')")
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
                    const[flat] += pseudo_norm2(op, (channels or {}).get(layer.label), identity, layer.label)
        params = tracked_parameters(net, include_bn_affine, include_bias)
        names = list(params)
        block_of = np.array([owner.get(id(params[n]), -1) for n in names], dtype=np.int64)
        multiplicity = getattr(net, "angle_multiplicity", None)
        return cls(names, block_of, offsets, const, found, multiplicity if callable(multiplicity) else None)


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

    Example::

        layout = AngleLayout.build(net)
        stats = AngleStats.compute(layout, dict(net.named_parameters()), reference)
        stats.path_angles(np.array([[0, 1, 2], [1, 1, 0]]))
    """

    def __init__(self, layout: AngleLayout, per_param: np.ndarray) -> None:
        self.layout = layout
        fixed = layout.block_of < 0
        self.fixed = per_param[fixed].sum(axis=0) if fixed.any() else np.zeros(3)
        self.blocks = np.zeros((len(layout.const), 3), dtype=np.float64)
        np.add.at(self.blocks, layout.block_of[~fixed], per_param[~fixed])
        # pseudo-weights are identical in both vectors: they add c to the dot product and to both norms
        self._blocks_c = self.blocks + layout.const[:, None]

    @classmethod
    def compute(
        cls, layout: AngleLayout, params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
    ) -> AngleStats:
        return cls(layout, parameter_stats(params, reference, layout.names))

    def path_cos(self, archs: np.ndarray) -> np.ndarray:
        """cos θ of every row of an ``(n, decisions)`` array (1 for rows whose every path is dropped)."""
        archs = np.atleast_2d(np.asarray(archs, dtype=np.int64))
        gathered = self._blocks_c[archs + self.layout.offsets]  # (n, D, 3)
        dropped = np.zeros(len(archs), dtype=bool)
        if self.layout.multiplicity is not None:
            mult = np.asarray(self.layout.multiplicity(archs), dtype=np.float64)
            dropped = mult.sum(axis=1) == 0
            totals = self.fixed + np.einsum("nd,ndk->nk", mult, gathered)
        else:
            totals = self.fixed + gathered.sum(axis=1)
        denom = np.sqrt(totals[:, 1] * totals[:, 2])
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(denom > 0, totals[:, 0] / denom, 1.0)
        cos = np.clip(cos, -1.0, 1.0)
        cos[dropped] = 1.0
        return cos

    def path_angles(self, archs: np.ndarray) -> np.ndarray:
        """θ (radians) of every row of an ``(n, decisions)`` array; 0 where every path is dropped."""
        return np.arccos(self.path_cos(archs))

    def op_angles(self) -> list[list[float]]:
        """θ of each op's own weights (summed over the layers of its decision); NaN for ops without weights."""
        b = self._blocks_c
        denom = np.sqrt(b[:, 1] * b[:, 2])
        with np.errstate(invalid="ignore", divide="ignore"):
            theta = np.where(denom > 0, np.arccos(np.clip(b[:, 0] / denom, -1.0, 1.0)), np.nan)
        ends = list(self.layout.offsets[1:]) + [len(theta)]
        return [theta[s:e].tolist() for s, e in zip(self.layout.offsets, ends)]
