"""The statistics and the supernet config behind the issue-24 rank tables (``benchmarks/search_quality_ranks.py``)."""

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import rank_stats
    import search_quality_ranks

    return rank_stats, search_quality_ranks


def test_within_group_tau_weights_each_group_by_its_size(bench_modules):
    rank_stats, _ = bench_modules
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    acc = np.array([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 5.0, 6.0])
    score = np.array([10.0, 20.0, 30.0, 40.0, 3.0, 2.0, 1.0, 0.0, 1.0])  # group 0 tau +1, group 1 tau -1
    # group 2 has two cells (< min_size 3) and is left out: (4 * 1 + 3 * -1) / 7
    assert rank_stats.within_group_tau(score, acc, groups) == pytest.approx(1 / 7)
    # a score that is a function of the group (the parameter count itself) knows nothing inside a group
    assert np.isnan(rank_stats.within_group_tau(groups.astype(float), acc, groups))


def test_top_k_mean_and_rank_summary(bench_modules):
    rank_stats, _ = bench_modules
    acc = np.array([90.0, 80.0, 70.0, 60.0])
    score = np.array([1.0, 3.0, 3.0, 2.0])
    assert rank_stats.top_k_mean(score, acc, 1) == 80.0  # a tie goes to the lower official index
    assert rank_stats.top_k_mean(score, acc, 3) == pytest.approx(70.0)
    with pytest.raises(ValueError, match="k=5"):
        rank_stats.top_k_mean(score, acc, 5)
    row = rank_stats.rank_summary(-acc, acc, np.zeros(4), top_k=2)
    assert row == {"tau": pytest.approx(-1.0), "within_tau": pytest.approx(-1.0), "top_k": 65.0}


def test_t_interval_matches_the_student_t_formula(bench_modules):
    rank_stats, _ = bench_modules
    low, high = rank_stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 / np.sqrt(3)  # t(0.975, 2 dof) * sd 1 / sqrt(3)
    assert (low, high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    with pytest.raises(ValueError, match="at least two"):
        rank_stats.t_interval([0.5])


def test_rank_supernets_are_the_quickstart_without_shrinking(bench_modules):
    _, ranks = bench_modules
    import yaml

    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    for labels in ("random", "true"):
        config = ranks.supernet_config(labels)
        [tracker] = config["trainer"]["callbacks"]  # no ProgressivePruner, no EvolutionSearch
        assert tracker["class_path"].endswith("AngleTracker")
        assert tracker["init_args"]["preset"] == "rlnas_nb201" and tracker["init_args"]["cells_only"] is False
        assert config["model"] == quickstart["model"]
        assert {k: v for k, v in config["trainer"].items() if k != "callbacks"} == {
            k: v for k, v in quickstart["trainer"].items() if k != "callbacks"}
        assert config["seed_everything"] == quickstart["seed_everything"]
    assert ranks.supernet_config("random")["data"] == quickstart["data"]
    assert ranks.supernet_config("true")["data"] == quickstart["data"]["init_args"]["datamodule"]
    with pytest.raises(ValueError, match="'random', 'true'"):
        ranks.supernet_config("noisy")
