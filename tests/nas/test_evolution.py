"""The evolutionary search core: SPOS semantics, determinism, constraints, resume."""

import json
import math

import pytest

from lightning_nd.nas.evolution import Evolution, progress_figure

OPTIONS = [list(range(4))] * 12  # 4^12 = 16.7M architectures: never exhausted by 1000 evaluations
TARGET = [1, 3, 0, 2] * 3


def hamming_score(arch):
    return -float(sum(a != t for a, t in zip(arch, TARGET)))


def test_spos_defaults_generation_sizes_and_no_duplicates():
    search = Evolution(OPTIONS, seed=0)
    assert (search.population, search.top_k, search.mutations, search.crossovers, search.generations) == (
        50, 10, 25, 25, 20)
    assert search.mutation_prob == 0.1
    search.run(hamming_score)
    assert [len(h["scores"]) for h in search.history] == [50] * 20
    archs = [tuple(a) for a, _ in search.records]
    assert len(archs) == len(set(archs)) == 1000  # duplicates skipped
    best = [h["best"] for h in search.history]
    assert best == sorted(best)  # the best so far never gets worse
    assert search.best == (TARGET, 0.0)  # the optimum of this smooth toy score is found


def test_children_come_from_top_k_parents():
    search = Evolution(OPTIONS, seed=3, mutation_prob=0.0, crossovers=0, mutations=25)
    search.tell(search.ask(), [hamming_score(a) for a in search.ask()])
    parents = {tuple(a) for a, _ in search.top(search.top_k)}
    children = search.ask()[:25]
    # with p=0 a mutation is a copy of a parent; copies are duplicates, so none may be proposed: the mutation slots
    # stay empty and random architectures refill the generation
    assert not parents & {tuple(c) for c in children}
    search2 = Evolution(OPTIONS, seed=3, mutation_prob=1 / 12, crossovers=0, mutations=25)
    search2.tell(search2.ask(), [hamming_score(a) for a in search2.ask()])
    top = [a for a, _ in search2.top(10)]
    mutants = search2.ask()[:25]
    assert all(min(sum(x != y for x, y in zip(m, p)) for p in top) <= 4 for m in mutants)


def test_determinism_under_a_seed():
    a, b, c = Evolution(OPTIONS, seed=7), Evolution(OPTIONS, seed=7), Evolution(OPTIONS, seed=8)
    for search in (a, b, c):
        search.run(hamming_score)
    assert a.records == b.records and a.history == b.history
    assert a.records != c.records


def test_constraints_always_respected():
    def constraint(arch):  # about 1/3 of the space is feasible; the unconstrained optimum is not
        return sum(arch) <= 14

    calls = []

    def score(arch):
        calls.append(arch)
        return hamming_score(arch)

    search = Evolution(OPTIONS, constraint=constraint, seed=0)
    best, best_score = search.run(score), search.best[1]
    assert calls and all(constraint(a) for a in calls)
    assert all(constraint(a) for a, _ in search.records)
    assert constraint(best) and best_score < 0  # TARGET (sum 18) is infeasible
    with pytest.raises(RuntimeError, match="loosen the constraint"):
        Evolution(OPTIONS, constraint=lambda a: False, max_random_tries=100).ask()


def test_small_space_is_exhausted_cleanly():
    search = Evolution([[0, 1], [0, 2], [5]], seed=0)
    search.run(lambda a: float(sum(a)))
    assert search.done and search.exhausted
    assert sorted(tuple(a) for a, _ in search.records) == [(0, 0, 5), (0, 2, 5), (1, 0, 5), (1, 2, 5)]
    assert search.best == ([1, 2, 5], 8.0)


def test_nan_scores_rank_last():
    search = Evolution([[0, 1, 2]], population=3, mutations=0, crossovers=0, generations=1)
    archs = search.ask()
    search.tell(archs, [math.nan if a == [2] else float(a[0]) for a in archs])
    assert search.best == ([1], 1.0)
    assert search.top()[-1][0] == [2]


def test_resumed_search_equals_an_uninterrupted_one():
    full = Evolution(OPTIONS, seed=1)
    full.run(hamming_score)

    first = Evolution(OPTIONS, seed=1)
    for _ in range(7):
        first.tell(first.ask(), [hamming_score(a) for a in first.ask()])
    pending = first.ask()  # interrupted after asking, before telling
    state = json.loads(json.dumps(first.state_dict()))  # serialisable as plain JSON

    resumed = Evolution(OPTIONS, seed=1)
    resumed.load_state_dict(state)
    assert resumed.ask() == pending
    resumed.run(hamming_score)
    assert resumed.records == full.records and resumed.history == full.history and resumed.best == full.best

    with pytest.raises(ValueError, match="does not match"):
        Evolution(OPTIONS, seed=2).load_state_dict(state)


def test_bad_arguments_and_protocol_errors():
    with pytest.raises(ValueError, match="empty"):
        Evolution([[0, 1], []])
    with pytest.raises(ValueError, match="exceeds population"):
        Evolution(OPTIONS, population=10, mutations=6, crossovers=6)
    with pytest.raises(ValueError, match="mutation_prob"):
        Evolution(OPTIONS, mutation_prob=1.5)
    with pytest.raises(ValueError, match="top_k"):
        Evolution(OPTIONS, top_k=0)
    search = Evolution(OPTIONS, population=4, mutations=1, crossovers=1, generations=2)
    with pytest.raises(RuntimeError, match="no architecture"):
        _ = search.best
    archs = search.ask()
    with pytest.raises(ValueError, match="last ask"):
        search.tell(archs[::-1], [0.0] * 4)
    with pytest.raises(ValueError, match="scores for"):
        search.tell(archs, [0.0])
    search.run(hamming_score)
    with pytest.raises(RuntimeError, match="done"):
        search.ask()


def test_progress_figure_renders():
    search = Evolution(OPTIONS, generations=3, seed=0)
    search.run(hamming_score)
    fig = progress_figure(search.history, metric="score")
    assert len(fig.axes[0].lines) == 2
    assert list(fig.axes[0].lines[0].get_ydata()) == [h["best"] for h in search.history]
