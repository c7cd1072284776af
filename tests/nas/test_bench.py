"""NAS-Bench-201 offline: the shipped table, lookups by string and by our encoding, networks, rank correlations."""

import gzip
import hashlib
import math

import numpy as np
import pytest
from scipy import stats

from lightning_nd.nas import get_arch, set_arch
from lightning_nd.nas.bench import DATA_FILE, NB201, format_arch_str, is_connected, parse_arch_str

BEST_C10 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
ARCH_11 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|none~0|nor_conv_3x3~1|avg_pool_3x3~2|"


@pytest.fixture(scope="module")
def bench():
    return NB201()


def test_shipped_table_is_the_published_one(bench):
    digest = hashlib.sha256(gzip.decompress(DATA_FILE.read_bytes())).hexdigest()
    assert digest == "cb5d777ec3368be83c8f9b3aa4d520696051cb0eb8d94b8f85b519f9ea4afa3e"
    assert (DATA_FILE.parent / "PROVENANCE.md").read_text().count("NATS-Bench") >= 3
    assert len(bench) == 15625
    assert len({bench.unique_str(bench.arch_str(i)) for i in range(len(bench))}) == 6466
    # published optima (NAS-Bench-201 paper) and official records of indices 0, 11, 284 (nas.md section 6)
    assert bench.best("cifar10") == (BEST_C10, pytest.approx(94.3733, abs=1e-4))
    assert bench.index(BEST_C10) == 6111
    assert bench.best("cifar100")[1] == pytest.approx(73.5133, abs=1e-4)
    assert bench.best("ImageNet16-120")[1] == pytest.approx(47.3111, abs=1e-4)
    assert bench.index(bench.best("in16")[0]) == 857
    assert [round(bench.accuracy(bench.arch_str(i)), 3) for i in (0, 11, 284)] == [85.863, 91.583, 88.790]
    assert bench.arch_str(11) == ARCH_11
    assert bench.accuracies().mean() == pytest.approx(87.06, abs=0.01)


def test_disconnected_cells_sit_at_chance(bench):
    disconnected = [i for i in range(len(bench)) if not is_connected(bench.arch_str(i))]
    assert len(disconnected) == 341
    assert np.allclose(bench.accuracies("cifar10")[disconnected], 10.0)


def test_formulas_match_official_records(bench):
    # official C10 FLOPs / params (millions) of indices 0, 11, 284 (NATS-Bench records)
    for index, flops, params in ((0, 15.64737, 0.129306), (11, 113.95137, 0.802426), (284, 11.71521, 0.101306)):
        assert NB201.flops(bench.arch_str(index)) == pytest.approx(flops, abs=1e-5)
        assert NB201.params(bench.arch_str(index)) == pytest.approx(params, abs=1e-6)


def test_string_parsing_and_errors(bench):
    for i in (0, 11, 284, 6111, 15624):
        assert format_arch_str(parse_arch_str(bench.arch_str(i))) == bench.arch_str(i)
    with pytest.raises(ValueError, match="3 nodes"):
        parse_arch_str("|none~0|")
    with pytest.raises(ValueError, match="bad edge"):
        bench.accuracy(BEST_C10.replace("nor_conv_1x1", "conv_5x5"))
    with pytest.raises(ValueError, match="allowed"):
        bench.accuracy(BEST_C10, "svhn")
    with pytest.raises(ValueError, match="6 indices"):
        bench.accuracy([0, 1, 2])


def test_lookup_by_string_and_by_our_encoding_agree(bench):
    from lightning_nd.nas.spaces import build_space
    from lightning_nd.nas.spaces.nb201 import NB201_OPS, arch_to_str, str_to_arch

    assert list(NB201_OPS) == ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
    space = build_space("nb201", num_classes=10, C=4, N=1)
    for text in bench.sample(300, seed=0) + [BEST_C10, ARCH_11]:
        ours = str_to_arch(text)
        assert ours == [NB201_OPS.index(op) for op in parse_arch_str(text)]  # edge order 1<-0, 2<-0, ..., 3<-2
        assert arch_to_str(ours) == text
        for dataset in NB201.datasets:
            assert bench.accuracy(ours, dataset) == bench.accuracy(text, dataset)
        set_arch(space, ours)
        assert bench.index(get_arch(space)) == bench.index(text)


@pytest.mark.parametrize("index", [0, 11, 284, 6111])
def test_build_has_the_official_parameter_count(bench, index):
    text = bench.arch_str(index)
    net = NB201.build(text, num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == round(NB201.params(text) * 1e6)
    assert not any(type(m).__name__ == "Choice" for m in net.modules())


def test_correlate_matches_scipy_and_handles_non_finite_scores(bench):
    archs = bench.sample(200, seed=1)
    rng = np.random.default_rng(0)
    scores = [bench.accuracy(a) + rng.normal(0, 3) for a in archs]
    result = bench.correlate(archs, scores, name="noisy accuracy")
    accs = [bench.accuracy(a) for a in archs]
    assert result.kendall == pytest.approx(stats.kendalltau(scores, accs).statistic, abs=1e-6)
    assert result.spearman == pytest.approx(stats.spearmanr(scores, accs).statistic, abs=1e-6)
    assert result.pick == (archs[int(np.argmax(scores))], accs[int(np.argmax(scores))])
    params = bench.correlate(archs, NB201.params, name="params")  # a callable score
    assert 0.3 < params.kendall < 0.8 and params.pick[1] > 85
    # -inf ranks last, NaN is dropped
    bad = list(scores)
    bad[0], bad[1] = -math.inf, math.nan
    broken = bench.correlate(archs, bad)
    assert broken.dropped == 1 and len(broken.archs) == 199
    ranked = [min(scores) - 10] + scores[2:]
    assert broken.kendall == pytest.approx(stats.kendalltau(ranked, [accs[0]] + accs[2:]).statistic, abs=1e-6)
    fig = result.figure()
    assert "Kendall" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="scores for"):
        bench.correlate(archs, scores[:5])
