"""DARTS's retrain network (``quark0/darts: cnn/model.py`` ``NetworkCIFAR``) for a :class:`~.darts.Genotype`.

The cells apply the genotype's ops (affine BN) to the chosen states, with drop path on every non-identity op
during training; an optional auxiliary head sits after cell ``2 * layers // 3`` (CIFAR head, 8x8 input at 32x32
images). ``forward`` returns the logits; in training mode with the auxiliary head the auxiliary logits are kept in
``.aux_logits`` (DARTS weighs their loss by 0.4). ``drop_path_prob`` is an attribute, as in DARTS, where the
training script raises it linearly per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_nd.nas.spaces.darts import Genotype, _check_sizes, _reductions, genotype_to_dict, resolve_genotype
from lightning_nd.nas.spaces.darts_ops import OPS, FactorizedReduce, Identity, ReLUConvBN


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob`` and rescale the rest (DARTS ``utils.drop_path``)."""
    keep = 1.0 - drop_prob
    mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)  # a method call: traceable by torch.fx
    return x / keep * mask


class GenotypeCell(nn.Module):
    """One cell of the retrain network: two ops per node, on the states the genotype names."""

    def __init__(self, genotype: Genotype, c_pp: int, c_p: int, C: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.preprocess0 = FactorizedReduce(c_pp, C) if reduction_prev else ReLUConvBN(c_pp, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_p, C, 1, 1, 0)
        pairs, concat = (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        if len(pairs) % 2 or not pairs:
            raise ValueError(f"a genotype cell needs two (op, input) pairs per node, got {len(pairs)} pairs")
        self.steps = len(pairs) // 2
        self.indices = [int(k) for _, k in pairs]
        for n, k in enumerate(self.indices):
            if not 0 <= k < 2 + n // 2:
                raise ValueError(f"node {2 + n // 2} of the genotype takes input {k}; allowed 0..{1 + n // 2}")
        for name, _ in pairs:
            if name not in OPS:
                raise ValueError(f"unknown DARTS op {name!r} in the genotype; allowed: {sorted(OPS)}")
        self.concat = [int(i) for i in concat]
        self.multiplier = len(self.concat)
        self.ops = nn.ModuleList(
            OPS[name](C, 2 if reduction and k < 2 else 1, True) for name, k in zip((n for n, _ in pairs), self.indices)
        )
        self.drop_prob = 0.0

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            total = None
            for op, k in ((self.ops[2 * i], self.indices[2 * i]), (self.ops[2 * i + 1], self.indices[2 * i + 1])):
                h = op(states[k])
                if self.training and self.drop_prob > 0.0 and not isinstance(op, Identity):
                    h = drop_path(h, self.drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """DARTS's auxiliary classifier (8x8 input): ReLU, 5x5/3 average pool, 1x1 and 2x2 convs with BN, linear."""

    def __init__(self, C: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class DartsNetwork(nn.Module):
    """DARTS ``NetworkCIFAR`` for a genotype, trained from scratch (a plain model for ``ImageClassifier``).

    Args:
        genotype: a :data:`~.darts.GENOTYPES` name, a ``Genotype``, a dict, or an ``arch.json`` of a DARTS search.
        C: channels of the first cells (DARTS CIFAR: 36).
        layers: number of cells (DARTS CIFAR: 20; at least 3).
        num_classes: classifier outputs.
        auxiliary: add the auxiliary head (its logits in ``.aux_logits`` during training).
        drop_path_prob: drop-path probability of every non-identity op during training.
        in_chans: input channels.
        stem_multiplier: stem width as a multiple of ``C``.

    Raises:
        ValueError: for sizes out of range, an unknown genotype or op, or a node input out of range.

    Example::

        net = build_network("darts_v2", C=36, layers=20, num_classes=10)
        net(torch.randn(2, 3, 32, 32)).shape  # (2, 10)
    """

    def __init__(self, genotype: Genotype | str | Path | dict, C: int = 36, layers: int = 20, num_classes: int = 10,
                 auxiliary: bool = False, drop_path_prob: float = 0.0, in_chans: int = 3, stem_multiplier: int = 3) -> None:
        super().__init__()
        _check_sizes(C, layers, 1)
        if not 0.0 <= drop_path_prob < 1.0:
            raise ValueError(f"drop_path_prob={drop_path_prob} must be in [0, 1)")
        self.genotype = resolve_genotype(genotype)
        self.layers, self.auxiliary = layers, auxiliary
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev, c_aux = False, c_p
        for i in range(layers):
            reduction = i in _reductions(layers)
            c_curr = c_curr * 2 if reduction else c_curr
            cell = GenotypeCell(self.genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == 2 * layers // 3:
                c_aux = c_p
        self.auxiliary_head = AuxiliaryHeadCIFAR(c_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)
        self.drop_path_prob = float(drop_path_prob)
        self.aux_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux_logits = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            cell.drop_prob = self.drop_path_prob
            s0, s1 = s1, cell(s0, s1)
            if i == 2 * self.layers // 3 and self.auxiliary_head is not None and self.training:
                self.aux_logits = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def arch_json(self) -> dict[str, Any]:
        """The genotype in ``arch.json`` form."""
        return {"genotype": genotype_to_dict(self.genotype)}

