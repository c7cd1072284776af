"""The DARTS cell space (Liu et al., ICLR 2019) as a one-shot supernet, its genotypes and the retrain network.

Search network (``build_space("darts", ...)``, official ``cnn/model_search.py`` and RLNAS's
``darts_search_space/*/train_supernet/super_model.py``): a stem, ``layers`` cells with reductions at ``layers // 3``
and ``2 * layers // 3``, every cell ``preprocess0`` (``FactorizedReduce`` after a reduction, else ReLU-Conv-BN),
``preprocess1`` and ``steps`` intermediate nodes whose outputs are concatenated. Node ``j`` (2..steps+1) takes two
of its ``j`` predecessors: an :class:`~lightning_nd.nas.choice.InputChoice` (key ``"normal.n3.inputs"``) picks the
pair, and each input edge is a ``Choice`` over the DARTS ops (key ``"normal.n3<-1"``) gated by that input, so only
the two chosen edges run. All normal cells share one architecture, all reduction cells another (RLNAS encoding).

``none`` stays a candidate (op indices equal the official ``PRIMITIVES``) but is masked out by default
(``allow_none=False``): in DARTS an edge that carries nothing is an unchosen input, and neither the DARTS genotype
nor RLNAS's ``check_cand`` ever puts ``none`` on one of a node's two edges.

Retrain network (:func:`build_network`, official ``cnn/model.py`` ``NetworkCIFAR``): the cells of a
:class:`Genotype`, affine BN, optional auxiliary head after cell ``2 * layers // 3`` and drop path.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_nd.nas.arch import decisions, used_mask
from lightning_nd.nas.choice import Choice, InputChoice
from lightning_nd.nas.spaces.darts_ops import DARTS_OPS, OPS, FactorizedReduce, ReLUConvBN, search_op

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

# Official cells: DARTS ``cnn/genotypes.py`` (V1 first order, V2 second order); RLNAS
# ``darts_search_space/{cifar10,imagenet}/rlnas/retrain_architecture/genotypes.py`` (``RLDARTS``; the ImageNet one is
# the search under 600M FLOPs).
GENOTYPES: dict[str, Genotype] = {
    "darts_v1": Genotype(
        normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
        reduce_concat=[2, 3, 4, 5],
    ),
    "darts_v2": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
        reduce_concat=[2, 3, 4, 5],
    ),
    "rlnas_cifar10": Genotype(
        normal=[("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("dil_conv_3x3", 0), ("sep_conv_5x5", 2),
                ("sep_conv_3x3", 0), ("dil_conv_5x5", 3), ("dil_conv_5x5", 1), ("dil_conv_3x3", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("sep_conv_5x5", 0), ("dil_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
                ("dil_conv_3x3", 1), ("sep_conv_3x3", 3), ("max_pool_3x3", 1), ("sep_conv_5x5", 2)],
        reduce_concat=[2, 3, 4, 5],
    ),
    "rlnas_imagenet": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 1), ("sep_conv_3x3", 2),
                ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("skip_connect", 0), ("sep_conv_3x3", 4)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 1),
                ("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1)],
        reduce_concat=[2, 3, 4, 5],
    ),
}
CELL_KINDS = ("normal", "reduce")


def _reductions(layers: int) -> tuple[int, int]:
    return layers // 3, 2 * layers // 3


def _check_sizes(C: int, layers: int, steps: int) -> None:
    if C < 1 or steps < 1:
        raise ValueError(f"C={C} and steps={steps} must be >= 1")
    if layers < 3:
        raise ValueError(f"layers={layers} must be >= 3 so that the network has both normal and reduction cells")


# ---------------------------------------------------------------------------------------------- search network
class SearchNode(nn.Module):
    """Intermediate node ``j``: two of its ``j`` inputs (an ``InputChoice``), one op ``Choice`` per input edge."""

    def __init__(self, kind: str, j: int, C: int, reduction: bool, ops: Sequence[str], affine: bool) -> None:
        super().__init__()
        self.inputs = InputChoice(j, 2, key=f"{kind}.n{j}.inputs")
        self.edges = nn.ModuleList()
        for k in range(j):
            stride = 2 if reduction and k < 2 else 1
            edge = Choice({name: search_op(name, C, stride, affine) for name in ops}, key=f"{kind}.n{j}<-{k}")
            edge.gate = (self.inputs.key, k)
            self.edges.append(edge)

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        first, *rest = self.inputs.chosen  # also a PickInputs in an exported subnet
        out = self.edges[first](states[first])
        for k in rest:
            out = out + self.edges[k](states[k])
        return out


class SearchCell(nn.Module):
    """A search cell: preprocessing, ``steps`` nodes, the last ``multiplier`` node outputs concatenated."""

    def __init__(self, kind: str, c_pp: int, c_p: int, C: int, reduction: bool, reduction_prev: bool,
                 ops: Sequence[str], affine: bool, steps: int, multiplier: int) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(c_pp, C, affine) if reduction_prev else ReLUConvBN(c_pp, C, 1, 1, 0, affine)
        self.preprocess1 = ReLUConvBN(c_p, C, 1, 1, 0, affine)
        self.nodes = nn.ModuleList(SearchNode(kind, 2 + i, C, reduction, ops, affine) for i in range(steps))
        self.multiplier = multiplier

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in self.nodes:
            states.append(node(states))
        return torch.cat(states[-self.multiplier:], dim=1)


def cell_paths(steps: int) -> list[list[int]]:
    """Every route from an input node (0, 1) through increasing intermediate nodes (RLNAS ``config.paths``: 30)."""
    nodes = list(range(2, steps + 2))
    routes = []
    for start in (0, 1):
        for mask in range(1, 2 ** len(nodes)):
            routes.append([start] + [n for b, n in enumerate(nodes) if mask >> b & 1])
    return routes


class DartsSupernet(nn.Module):
    """The DARTS search network as a single-path supernet (see the module doc).

    Args:
        num_classes: classifier outputs.
        in_chans: input channels.
        C: channels of the first cells (DARTS search: 16).
        layers: number of cells (DARTS search: 8; at least 3).
        steps: intermediate nodes per cell.
        multiplier: how many of the last node outputs a cell concatenates.
        stem_multiplier: stem width as a multiple of ``C``.
        ops: candidate op names (default DARTS's 8, in the official order).
        affine: BN affine inside cells and preprocessing (DARTS search: False; RLNAS's supernet: True).
        allow_none: leave ``none`` alive on edges (default: masked, see the module doc).
        input_size: input resolution (recorded for cost/angle tools; any size divisible by 4 works).

    Raises:
        ValueError: for sizes out of range or an unknown op.

    Example::

        net = build_space("darts", num_classes=10, in_chans=1, C=8, layers=5)
        set_arch(net, PathSampler(net).sample(0))
        net(torch.randn(2, 1, 28, 28)).shape   # (2, 10)
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, C: int = 16, layers: int = 8, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, ops: Sequence[str] = DARTS_OPS,
                 affine: bool = False, allow_none: bool = False, input_size: int = 32) -> None:
        super().__init__()
        _check_sizes(C, layers, steps)
        if not 1 <= multiplier <= steps:
            raise ValueError(f"multiplier={multiplier} must be in 1..steps={steps}")
        ops = [str(o) for o in ops]
        for name in ops:
            if name not in OPS:
                raise ValueError(f"unknown DARTS op {name!r}; allowed: {sorted(OPS)}")
        self.num_classes, self.in_chans, self.input_size = num_classes, in_chans, input_size
        self.C, self.layers, self.steps, self.multiplier, self.ops = C, layers, steps, multiplier, ops
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in _reductions(layers)
            c_curr = c_curr * 2 if reduction else c_curr
            kind = "reduce" if reduction else "normal"
            self.cells.append(
                SearchCell(kind, c_pp, c_p, c_curr, reduction, reduction_prev, ops, affine, steps, multiplier)
            )
            reduction_prev = reduction
            c_pp, c_p = c_p, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)
        if "none" in ops and not allow_none and len(ops) > 1:
            none = ops.index("none")
            for module in self.modules():
                if isinstance(module, Choice) and not isinstance(module, InputChoice):
                    module.alive[none] = False
        self._angle_plan: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def describe_arch(self, arch: Sequence[int]) -> dict[str, Any]:
        """Extra ``arch.json`` fields: the architecture as a DARTS genotype."""
        return {"genotype": genotype_to_dict(arch_to_genotype(self, arch))}

    def angle_multiplicity(self, archs: np.ndarray) -> np.ndarray:
        """How often each decision's op weights appear in RLNAS's DARTS path vector, per architecture.

        The official vector (``evolution_search/test_server.py`` ``get_arch_vector``) concatenates, per cell, the op
        weights along each of the 30 input->node routes (:func:`cell_paths`); a route through an unchosen edge or a
        ``none`` op is dropped. An edge thus counts once per surviving route through it.
        """
        found, plan = self._plan()
        archs = np.atleast_2d(np.asarray(archs, dtype=np.int64))
        ok = used_mask(found, archs)
        if "none" in self.ops:
            ok &= archs != self.ops.index("none")
        mult = np.zeros(archs.shape, dtype=np.float64)
        for route in plan:
            alive = ok[:, route].all(axis=1)
            mult[:, route] += alive[:, None]
        return mult

    def _plan(self) -> tuple[list, list[list[int]]]:
        if self._angle_plan is None:
            found = decisions(self)
            index = {d.key: i for i, d in enumerate(found)}
            plan = [
                [index[f"{kind}.n{j}<-{k}"] for k, j in zip(route[:-1], route[1:])]
                for kind in CELL_KINDS
                for route in cell_paths(self.steps)
            ]
            self._angle_plan = (found, plan)
        return self._angle_plan


# ---------------------------------------------------------------------------------------------- genotypes
def arch_to_genotype(supernet: nn.Module, arch: Sequence[int]) -> Genotype:
    """The DARTS genotype of an architecture of a :class:`DartsSupernet` (inputs in ascending order per node).

    Raises:
        ValueError: when ``supernet`` is not a DARTS supernet or ``arch`` does not fit it.
    """
    found = decisions(supernet)
    if len(arch) != len(found):
        raise ValueError(f"architecture has {len(arch)} entries but the DARTS space has {len(found)} decisions")
    ops = {d.key: d.names[int(a)] for d, a in zip(found, arch)}
    return genotype_from_ops(ops, getattr(supernet, "steps", 4), getattr(supernet, "multiplier", 4))


def genotype_from_ops(ops: dict[str, str], steps: int = 4, multiplier: int = 4) -> Genotype:
    """The genotype encoded by an ``arch.json`` ``"ops"`` mapping of the DARTS space (no supernet needed).

    Raises:
        ValueError: when a node's input choice or a chosen edge's op is missing.
    """
    cells = {}
    for kind in CELL_KINDS:
        cell = []
        for j in range(2, steps + 2):
            key = f"{kind}.n{j}.inputs"
            if key not in ops:
                raise ValueError(f"the architecture has no decision {key!r}: not a DARTS-space architecture")
            for k in (int(i) for i in str(ops[key]).split("+")):
                edge = f"{kind}.n{j}<-{k}"
                if edge not in ops:
                    raise ValueError(f"the architecture has no op for the chosen edge {edge!r}")
                cell.append((ops[edge], k))
        cells[kind] = cell
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(cells["normal"], concat, cells["reduce"], list(concat))


def genotype_to_arch(supernet: nn.Module, genotype: Genotype) -> list[int]:
    """The architecture of ``supernet`` that spells ``genotype`` (ops on unchosen inputs: the first alive op).

    Raises:
        ValueError: when a node does not take two distinct inputs or an op is not a candidate.
    """
    from lightning_nd.nas.arch import canonical_arch

    found = decisions(supernet)
    index = {d.key: i for i, d in enumerate(found)}
    arch = [d.alive[0] if d.alive else 0 for d in found]
    for kind, cell in (("normal", genotype.normal), ("reduce", genotype.reduce)):
        for n, pair in enumerate(zip(cell[0::2], cell[1::2])):
            j = n + 2
            inputs = tuple(sorted(int(k) for _, k in pair))
            d = found[index[f"{kind}.n{j}.inputs"]]
            if inputs not in d.combinations:
                raise ValueError(f"node {j} of the {kind} cell takes inputs {inputs}; allowed: {d.combinations}")
            arch[index[d.key]] = d.combinations.index(inputs)
            for name, k in pair:
                e = found[index[f"{kind}.n{j}<-{k}"]]
                if name not in e.names:
                    raise ValueError(f"op {name!r} of edge {e.key!r} is not a candidate; allowed: {e.names}")
                arch[index[e.key]] = e.names.index(name)
    return canonical_arch(found, arch)


def genotype_to_dict(genotype: Genotype) -> dict[str, Any]:
    return {field: [list(x) if isinstance(x, tuple) else x for x in getattr(genotype, field)]
            for field in Genotype._fields}


def resolve_genotype(genotype: Genotype | str | Path | dict) -> Genotype:
    """A genotype from a :data:`GENOTYPES` name, a ``Genotype``, a dict, or an ``arch.json`` (its ``"best"``).

    Raises:
        ValueError: for an unknown name or a file/dict that holds no DARTS genotype.
    """
    if isinstance(genotype, Genotype):
        return genotype
    if isinstance(genotype, str) and genotype in GENOTYPES:
        return GENOTYPES[genotype]
    if isinstance(genotype, (str, Path)):
        path = Path(genotype)
        if not path.is_file():
            raise ValueError(f"genotype {str(genotype)!r} is neither a GENOTYPES name {sorted(GENOTYPES)} nor a file")
        genotype = json.loads(path.read_text())
    if not isinstance(genotype, dict):
        raise ValueError(f"cannot read a genotype from a {type(genotype).__name__}")
    data = genotype.get("best", genotype) if isinstance(genotype.get("best"), dict) else genotype
    if "genotype" in data:
        data = data["genotype"]
    elif "ops" in data:
        return genotype_from_ops(data["ops"])
    missing = [f for f in Genotype._fields if f not in data]
    if missing:
        raise ValueError(f"the genotype data lacks {missing}; expected the fields {list(Genotype._fields)}")
    return Genotype(*[[tuple(x) if isinstance(x, list) else x for x in data[f]] for f in Genotype._fields])


def build_network(genotype: Genotype | str | Path | dict, C: int, layers: int, num_classes: int,
                  auxiliary: bool = False, drop_path_prob: float = 0.0, **kwargs: Any) -> nn.Module:
    """DARTS's ``NetworkCIFAR`` for ``genotype`` (see :class:`~lightning_nd.nas.spaces.darts_network.DartsNetwork`).

    Example::

        net = build_network(GENOTYPES["darts_v2"], C=36, layers=20, num_classes=10, auxiliary=True, drop_path_prob=0.2)
    """
    from lightning_nd.nas.spaces.darts_network import DartsNetwork

    return DartsNetwork(genotype, C, layers, num_classes, auxiliary, drop_path_prob, **kwargs)
