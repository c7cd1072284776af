"""NAS-Bench-201 offline: the benchmark's ground truth, the standalone network of a cell, and rank correlations.

NAS-Bench-201 trained every one of the 5^6 = 15,625 cells of its space to convergence on CIFAR-10, CIFAR-100 and
ImageNet16-120. Its table of 200-epoch test accuracies (NATS-Bench TSS, shipped in ``lightning_nd/nas/data/`` with
its provenance) turns a search on the ``nb201`` space into a measurement: the found cell's real accuracy, and how
well any score (path angle, supernet accuracy, NASWOT, parameter count) ranks cells, as Kendall's tau and Spearman's
rho (torchmetrics) over a sample of architectures.

Architectures are given either as the official string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` or in our encoding,
one index into ``NB201_OPS`` per edge (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2), as the ``nb201`` space's
``get_arch`` returns it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DATA_FILE = Path(__file__).parent / "data" / "nb201_natsbench_tss_test_acc_200ep.csv.gz"
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
_COLUMNS = {
    "cifar10": "CIFAR10TestAccuracy200Epochs",
    "cifar100": "CIFAR100TestAccuracy200Epochs",
    "ImageNet16-120": "ImageNetTestAccuracy200Epochs",
}
_ALIASES = {"cifar10": "cifar10", "cifar-10": "cifar10", "cifar100": "cifar100", "cifar-100": "cifar100"}
_ALIASES.update(dict.fromkeys(("imagenet16-120", "imagenet16", "in16", "imagenet"), "ImageNet16-120"))
# Exact parameter counts (millions) and official FLOPs (conv/linear MACs, millions) from nas.md section 6.
_PARAM_BASE = {"cifar10": 0.073306, "cifar100": 0.079156, "ImageNet16-120": 0.080456}
_FLOPS = {"cifar10": (7.78305, 35.38944, 3.93216), "cifar100": (7.78890, 35.38944, 3.93216),
          "ImageNet16-120": (1.95340, 8.84736, 0.98304)}


def parse_arch_str(arch: str) -> list[str]:
    """The six edge ops of an official cell string, in edge order (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2).

    Raises:
        ValueError: when the string is not a NAS-Bench-201 cell (wrong nodes, inputs or op names).
    """
    nodes = arch.strip().split("+")
    ops: list[str] = []
    if len(nodes) != 3:
        raise ValueError(f"{arch!r} is not a NAS-Bench-201 cell string: expected 3 nodes joined by '+'")
    for node, text in enumerate(nodes, start=1):
        tokens = [t for t in text.split("|") if t]
        if len(tokens) != node:
            raise ValueError(f"{arch!r}: node {node} needs {node} inputs, got {len(tokens)}")
        for source, token in enumerate(tokens):
            op, _, inp = token.partition("~")
            if op not in OPS or inp != str(source):
                raise ValueError(f"{arch!r}: bad edge {token!r} (ops: {list(OPS)}, input must be {source})")
            ops.append(op)
    return ops


def format_arch_str(ops: Sequence[str]) -> str:
    """The official string of six edge ops given in edge order (inverse of :func:`parse_arch_str`)."""
    if len(ops) != 6 or any(op not in OPS for op in ops):
        raise ValueError(f"need 6 ops from {list(OPS)}, got {list(ops)}")
    nodes, k = [], 0
    for node in (1, 2, 3):
        nodes.append("|" + "|".join(f"{ops[k + i]}~{i}" for i in range(node)) + "|")
        k += node
    return "+".join(nodes)


def is_connected(arch: str) -> bool:
    """Whether some input->output path of the cell avoids ``none`` (the 341 disconnected cells train to chance)."""
    ops = parse_arch_str(arch)
    edge = {(1, 0): ops[0], (2, 0): ops[1], (2, 1): ops[2], (3, 0): ops[3], (3, 1): ops[4], (3, 2): ops[5]}
    reach = {0}
    for node in (1, 2, 3):
        if any(edge[(node, src)] != "none" and src in reach for src in range(node)):
            reach.add(node)
    return 3 in reach


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    raw = Path(path).read_bytes()
    text = gzip.decompress(raw).decode() if path.endswith(".gz") else raw.decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    archs = [r["ArchitectureString"] for r in rows]
    uniques = [r["UniqueString"] for r in rows]
    accs = {name: np.array([float(r[col]) for r in rows]) for name, col in _COLUMNS.items()}
    return archs, uniques, accs


def _to_str(arch: str | Sequence[int]) -> str:
    if isinstance(arch, str):
        return arch
    if isinstance(arch, torch.Tensor):
        arch = arch.tolist()
    indices = [int(i) for i in arch]
    if len(indices) != 6 or any(not 0 <= i < len(OPS) for i in indices):
        raise ValueError(f"{list(arch)} is not an nb201 architecture: need 6 indices in 0..{len(OPS) - 1}")
    from lightning_nd.nas.spaces.nb201 import arch_to_str

    return arch_to_str(indices)


class NB201:
    """The NAS-Bench-201 (NATS-Bench TSS) ground truth, read offline from the table shipped with the package.

    Args:
        path: a CSV (or ``.csv.gz``) in the shipped table's format; default the shipped table.

    Raises:
        ValueError: for an unknown dataset name or a string that is not a NAS-Bench-201 cell.
        KeyError: never for a valid cell: every one of the 15,625 cells is in the table.

    Example::

        bench = NB201()
        bench.accuracy("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|")
        # 94.373...
        bench.accuracy([3, 3, 3, 1, 3, 2], "cifar100")        # our encoding (indices into NB201_OPS)
        net = NB201.build("|nor_conv_3x3~0|+|none~0|skip_connect~1|+|none~0|none~1|nor_conv_1x1~2|", num_classes=10)
        result = bench.correlate(archs, scores)                 # Kendall tau, Spearman rho, scatter picture
    """

    datasets = tuple(_COLUMNS)

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(path or DATA_FILE)
        self._archs, self._uniques, self._accs = _load(self.path)
        self._index = {a: i for i, a in enumerate(self._archs)}

    def __len__(self) -> int:
        return len(self._archs)

    @staticmethod
    def dataset_name(dataset: str) -> str:
        """The canonical dataset name (``cifar10``, ``cifar100``, ``ImageNet16-120``) of a name or alias."""
        name = _ALIASES.get(dataset.lower()) if isinstance(dataset, str) else None
        if name is None:
            raise ValueError(f"unknown NAS-Bench-201 dataset {dataset!r}; allowed: {list(_COLUMNS)}")
        return name

    def index(self, arch: str | Sequence[int]) -> int:
        """The official index (0..15624) of a cell string or of an architecture in our encoding."""
        text = _to_str(arch)
        if text not in self._index:
            parse_arch_str(text)  # raises a clear error for malformed strings
            raise KeyError(f"{text!r} is not in the table {self.path}")
        return self._index[text]

    def arch_str(self, index: int) -> str:
        """The official string of the cell with official index ``index``."""
        return self._archs[index]

    def unique_str(self, arch: str | Sequence[int]) -> str:
        """The isomorphism class of a cell (equal strings: the same computation)."""
        return self._uniques[self.index(arch)]

    def accuracy(self, arch: str | Sequence[int], dataset: str = "cifar10") -> float:
        """Test accuracy (%) after 200 epochs, mean over seeds, of a cell string or an architecture in our encoding."""
        return float(self._accs[self.dataset_name(dataset)][self.index(arch)])

    def accuracies(self, dataset: str = "cifar10") -> np.ndarray:
        """All 15,625 accuracies (%) in official index order."""
        return self._accs[self.dataset_name(dataset)].copy()

    def best(self, dataset: str = "cifar10") -> tuple[str, float]:
        """The best cell of the benchmark on ``dataset`` and its accuracy."""
        accs = self._accs[self.dataset_name(dataset)]
        i = int(np.argmax(accs))
        return self._archs[i], float(accs[i])

    def sample(self, n: int, seed: int = 0, connected_only: bool = False) -> list[str]:
        """``n`` distinct cells drawn uniformly (seeded) from the table, optionally only connected ones."""
        pool = [a for a in self._archs if is_connected(a)] if connected_only else self._archs
        if not 0 < n <= len(pool):
            raise ValueError(f"n={n} must be in 1..{len(pool)}")
        picks = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
        return [pool[int(i)] for i in picks]

    @staticmethod
    def params(arch: str | Sequence[int], dataset: str = "cifar10") -> float:
        """Exact parameter count (millions) of the standalone network of a cell (formula, no network built)."""
        ops = parse_arch_str(_to_str(arch))
        base = _PARAM_BASE[NB201.dataset_name(dataset)]
        return base + 0.24304 * ops.count("nor_conv_3x3") + 0.028 * ops.count("nor_conv_1x1")

    @staticmethod
    def flops(arch: str | Sequence[int], dataset: str = "cifar10") -> float:
        """The benchmark's official FLOPs (millions of conv/linear multiply-accumulates) of a cell."""
        ops = parse_arch_str(_to_str(arch))
        base, per3, per1 = _FLOPS[NB201.dataset_name(dataset)]
        return base + per3 * ops.count("nor_conv_3x3") + per1 * ops.count("nor_conv_1x1")

    @staticmethod
    def build(arch: str | Sequence[int], num_classes: int = 10, **space_kwargs: Any) -> nn.Module:
        """The standalone network of a cell, freshly initialised, through the ``nb201`` space.

        Its parameter count equals the benchmark's for ``num_classes`` classes; ``space_kwargs`` (e.g. a smaller
        channel count or ``in_chans``) go to ``build_space("nb201", ...)``.
        """
        from lightning_nd.nas.arch import export_subnet
        from lightning_nd.nas.spaces import build_space
        from lightning_nd.nas.spaces.nb201 import str_to_arch

        text = _to_str(arch)
        parse_arch_str(text)
        space = build_space("nb201", num_classes=num_classes, **space_kwargs)
        return export_subnet(space, str_to_arch(text), inherit_weights=False)

    def correlate(
        self,
        archs: Sequence[str | Sequence[int]],
        scores: Sequence[float] | Callable[[str], float],
        dataset: str = "cifar10",
        name: str = "score",
    ) -> Correlation:
        """Rank correlation between a score (higher = better) and the benchmark accuracy over ``archs``.

        ``scores`` is a sequence aligned with ``archs`` or a callable taking the official string. Non-finite scores
        are handled as NASWOT's ``nanargmax`` does: ``-inf``/``+inf`` rank below/above every finite score, ``NaN``
        scores are dropped (counted in ``Correlation.dropped``).

        Raises:
            ValueError: with fewer than 3 usable architectures or misaligned inputs.
        """
        texts = [_to_str(a) for a in archs]
        values = [float(scores(t)) for t in texts] if callable(scores) else [float(s) for s in scores]
        if len(values) != len(texts):
            raise ValueError(f"got {len(values)} scores for {len(texts)} architectures")
        accs = [self.accuracy(t, dataset) for t in texts]
        return Correlation.compute(texts, values, accs, self.dataset_name(dataset), name)


def rank_correlation(scores: Sequence[float], targets: Sequence[float]) -> tuple[float, float]:
    """Kendall's tau (variant b, ties handled) and Spearman's rho between two finite sequences (torchmetrics)."""
    from torchmetrics.functional import kendall_rank_corrcoef, spearman_corrcoef

    x = torch.tensor(list(scores), dtype=torch.float64)
    y = torch.tensor(list(targets), dtype=torch.float64)
    return float(kendall_rank_corrcoef(x, y)), float(spearman_corrcoef(x, y))


@dataclass
class Correlation:
    """How a score ranks NAS-Bench-201 cells: rank correlations, the pick, and a scatter picture."""

    name: str  # the score's name, for tables and pictures
    dataset: str  # benchmark dataset of the accuracies
    archs: list[str]  # official strings of the usable architectures
    scores: list[float]  # their scores (+-inf kept; NaN rows dropped)
    accuracies: list[float]  # their benchmark accuracies (%)
    kendall: float  # Kendall's tau-b
    spearman: float  # Spearman's rho
    dropped: int = 0  # architectures dropped for a NaN score
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (budget, seed, ...)

    @classmethod
    def compute(cls, archs: list[str], scores: list[float], accs: list[float], dataset: str, name: str) -> Correlation:
        keep = [i for i, s in enumerate(scores) if not math.isnan(s)]
        dropped = len(scores) - len(keep)
        if len(keep) < 3:
            raise ValueError(f"need at least 3 architectures with a score that is not NaN, got {len(keep)}")
        archs = [archs[i] for i in keep]
        scores = [scores[i] for i in keep]
        accs = [accs[i] for i in keep]
        finite = [s for s in scores if math.isfinite(s)]
        low = (min(finite) if finite else 0.0) - 1.0
        high = (max(finite) if finite else 0.0) + 1.0
        ranked = [low if s == -math.inf else high if s == math.inf else s for s in scores]
        tau, rho = rank_correlation(ranked, accs)
        return cls(name, dataset, archs, scores, accs, tau, rho, dropped=dropped)

    @property
    def pick(self) -> tuple[str, float]:
        """The best-scoring architecture and its benchmark accuracy (first one on ties)."""
        i = int(np.argmax(np.nan_to_num(np.array(self.scores), nan=-np.inf, neginf=-np.inf)))
        return self.archs[i], self.accuracies[i]

    def row(self) -> str:
        """A markdown table row: name, n, Kendall tau, Spearman rho, accuracy of the pick."""
        return f"| {self.name} | {len(self.archs)} | {self.kendall:.3f} | {self.spearman:.3f} | {self.pick[1]:.2f} |"

    def figure(self) -> Any:
        """A matplotlib scatter of score vs benchmark accuracy, titled with both correlations."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
        x = np.array(self.scores, dtype=float)
        finite = np.isfinite(x)
        ax.scatter(x[finite], np.array(self.accuracies)[finite], s=8, alpha=0.6)
        ax.set_xlabel(self.name)
        ax.set_ylabel(f"NAS-Bench-201 {self.dataset} test accuracy (%)")
        ax.set_title(f"{self.name}: Kendall {self.kendall:.3f}, Spearman {self.spearman:.3f} (n={len(x)})")
        fig.tight_layout()
        return fig
