"""Small statistics shared by the search-quality benchmarks: paired t-intervals and rank agreement of a score with
benchmark accuracy (Kendall tau-b over all cells, inside groups of equal size, and the mean accuracy of the top k).

Example::

    from rank_stats import rank_summary, t_interval
    row = rank_summary(angles, accuracies, params, top_k=1000)   # {"tau": ..., "top_k": ..., "within_tau": ...}
    low, high = t_interval([0.02, 0.01, 0.03])                   # 95 % interval of the mean difference
"""

from __future__ import annotations

from typing import Any

import numpy as np


def t_interval(diffs: Any, level: float = 0.95) -> list[float]:
    """Two-sided Student-t interval of the mean of paired differences (at least two of them).

    Raises:
        ValueError: for fewer than two differences.
    """
    from scipy import stats as st

    diff = np.asarray(diffs, dtype=float)
    if diff.size < 2:
        raise ValueError(f"a t-interval needs at least two paired differences, got {diff.size}")
    half = float(st.t.ppf(0.5 + level / 2, diff.size - 1) * diff.std(ddof=1) / np.sqrt(diff.size))
    return [float(diff.mean()) - half, float(diff.mean()) + half]


def within_group_tau(score: np.ndarray, acc: np.ndarray, groups: np.ndarray, min_size: int = 3) -> float:
    """Kendall tau-b of ``score`` with ``acc`` inside each group of equal ``groups`` value (e.g. parameter count),
    averaged with weights = group size; groups smaller than ``min_size`` or without a defined tau are left out.

    A score that is a function of ``groups`` alone (the parameter count itself) is constant in every group, has no
    defined tau anywhere, and gets NaN: it knows nothing beyond the grouping.
    """
    from scipy.stats import kendalltau

    score, acc, groups = np.asarray(score, dtype=float), np.asarray(acc, dtype=float), np.asarray(groups)
    total = weight = 0.0
    for value in np.unique(groups):
        group = groups == value
        if group.sum() < min_size or np.ptp(score[group]) == 0:
            continue
        tau = kendalltau(score[group], acc[group])[0]
        if np.isfinite(tau):
            total, weight = total + tau * group.sum(), weight + group.sum()
    return total / weight if weight else float("nan")


def unit_ranks(score: np.ndarray) -> np.ndarray:
    """Ranks of ``score`` scaled to [0, 1] (ties broken by position), for summing two scores' ranks."""
    score = np.asarray(score)
    return np.argsort(np.argsort(score, kind="stable"), kind="stable") / (len(score) - 1)


def top_k_mean(score: np.ndarray, acc: np.ndarray, k: int) -> float:
    """Mean accuracy of the ``k`` highest-scored cells (ties broken by position, i.e. official index order).

    Raises:
        ValueError: for ``k`` outside ``1..len(score)``.
    """
    score, acc = np.asarray(score, dtype=float), np.asarray(acc, dtype=float)
    if not 1 <= k <= len(score):
        raise ValueError(f"k={k} must be in 1..{len(score)}")
    return float(acc[np.argsort(-score, kind="stable")[:k]].mean())


def rank_summary(score: np.ndarray, acc: np.ndarray, params: np.ndarray, top_k: int | None = None) -> dict:
    """Kendall tau-b with ``acc``, the tau inside groups of equal ``params`` and (optionally) the top-``k`` mean."""
    from scipy.stats import kendalltau

    row = {"tau": float(kendalltau(score, acc)[0]), "within_tau": float(within_group_tau(score, acc, params))}
    if top_k is not None:
        row["top_k"] = top_k_mean(score, acc, top_k)
    return row
