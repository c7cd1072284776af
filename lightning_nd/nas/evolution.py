"""SPOS's evolutionary architecture search, as a pure, seeded ask/tell loop over any space.

Single Path One-Shot (Guo et al.) searches a trained supernet with a simple genetic algorithm
(``megvii-model/SinglePathOneShot: src/Search/search.py``):

1. generation 0: ``population`` random architectures that satisfy the constraint (FLOPs, params, ...);
2. every later generation: ``mutations`` children of random parents from the ``top_k`` best seen so far, each gene
   redrawn with probability ``mutation_prob``; ``crossovers`` children taking each gene from one of two top-k
   parents; random architectures refill the generation to ``population``;
3. an architecture already evaluated, or one that breaks the constraint, is never evaluated (SPOS's ``vis_dict``);
   mutation and crossover give up after ``10 x`` their count of tries, as in SPOS;
4. after ``generations`` generations the best architecture seen is the answer.

:class:`Evolution` knows nothing about supernets: it sees the alive options of every decision
(:func:`lightning_nd.nas.alive_options`), an optional ``constraint(arch) -> bool`` and the scores it is told (higher is
better; NaN counts as the worst).

Ties. Scores are ranked after rounding to ``tie_decimals`` decimals, so differences below that (float noise from
another thread count, machine or reduction order) cannot reorder the ranking; equal rounded scores are ordered by
an optional ``tiebreak(arch)`` (higher first) and then by the architecture encoding (lexicographically smallest
first). The rule is deterministic: the best architecture and the parents of every generation do not depend on
evaluation order or on noise below the tolerance. ``ask()`` proposes a whole generation, so a caller may score it any way it likes,
e.g. split across DDP ranks; ``tell()`` records the scores. The random draws of generation ``g`` come from
``numpy.random.default_rng([seed, g])``, so the search is a function of the seed and the scores alone, and its
:meth:`state_dict` (plain lists and numbers) resumes it exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Arch = list[int]


def _key(score: float, decimals: int | None) -> float:
    if math.isnan(score):
        return -math.inf
    return round(score, decimals) if decimals is not None else score


class Evolution:
    """The SPOS evolutionary search as a resumable ask/tell loop.

    Args:
        options: the allowed candidate indices of every decision (``alive_options(supernet)``).
        constraint: ``constraint(arch) -> bool``; architectures for which it is false are never proposed.
        population: architectures per generation (SPOS: 50).
        top_k: parents are drawn from the ``top_k`` best architectures seen so far (SPOS: 10).
        mutations: mutated children per generation (SPOS: 25).
        mutation_prob: probability that a mutated child redraws a gene (SPOS: 0.1).
        crossovers: crossover children per generation (SPOS: 25).
        generations: number of generations, the random first one included (SPOS: 20).
        seed: the search's seed.
        max_random_tries: tries to draw one generation's random architectures before giving up (a small or tightly
            constrained space may have fewer feasible, unseen architectures than the population).
        tie_decimals: scores are ranked rounded to this many decimals (``None``: exact); see the module doc.
        tiebreak: ``tiebreak(arch) -> float`` ordering equal rounded scores (higher first), before the encoding.
        canonical: ``canonical(arch) -> arch`` applied to every draw, mutation and crossover child before the
            duplicate check (input-choice spaces: ``lambda a: canonical_arch(decisions(net), a)``, so children that
            differ only in ops on unchosen inputs count as the same network).

    Raises:
        ValueError: for an empty space or decision, non-positive sizes, ``mutation_prob`` outside [0, 1], or
            mutations + crossovers > population; ``RuntimeError`` from :meth:`ask` when not a single architecture of
            the first generation satisfies the constraint.

    Example::

        search = Evolution(alive_options(supernet), constraint=lambda a: cost.flops(a) <= 330e6, seed=0)
        while not search.done:
            candidates = search.ask()
            search.tell(candidates, [score(a) for a in candidates])
        arch, score = search.best
    """

    def __init__(
        self,
        options: Sequence[Sequence[int]],
        constraint: Callable[[Arch], bool] | None = None,
        population: int = 50,
        top_k: int = 10,
        mutations: int = 25,
        mutation_prob: float = 0.1,
        crossovers: int = 25,
        generations: int = 20,
        seed: int = 0,
        max_random_tries: int = 10_000,
        tie_decimals: int | None = 6,
        tiebreak: Callable[[Arch], float] | None = None,
        canonical: Callable[[Arch], Arch] | None = None,
    ) -> None:
        self.options = [[int(i) for i in opts] for opts in options]
        if not self.options or any(not opts for opts in self.options):
            raise ValueError(f"the search space is empty: options per decision {self.options}")
        for name, value in (("population", population), ("top_k", top_k), ("generations", generations),
                            ("max_random_tries", max_random_tries)):
            if int(value) < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        for name, value in (("mutations", mutations), ("crossovers", crossovers)):
            if int(value) < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if mutations + crossovers > population:
            raise ValueError(f"mutations + crossovers = {mutations + crossovers} exceeds population={population}")
        if not 0.0 <= mutation_prob <= 1.0:
            raise ValueError(f"mutation_prob={mutation_prob} must be in [0, 1]")
        self.constraint = constraint
        self.population, self.top_k, self.generations = int(population), int(top_k), int(generations)
        self.mutations, self.crossovers, self.mutation_prob = int(mutations), int(crossovers), float(mutation_prob)
        self.seed, self.max_random_tries = int(seed), int(max_random_tries)
        self.tie_decimals, self.tiebreak = tie_decimals, tiebreak
        self.canonical = canonical
        self._tiebreaks: dict[tuple[int, ...], float] = {}
        self.generation = 0  # completed generations
        self.records: list[tuple[Arch, float]] = []  # every evaluated architecture and its score, in order
        self.history: list[dict[str, Any]] = []  # per generation: scores, best so far, top-k mean
        self.pending: list[Arch] | None = None  # the generation asked for and not yet told
        self.exhausted = False  # no new feasible architecture could be found
        self._seen: set[tuple[int, ...]] = set()

    # ------------------------------------------------------------------ the loop
    @property
    def done(self) -> bool:
        """Whether all generations ran (or the space ran out of new feasible architectures)."""
        return self.generation >= self.generations or self.exhausted

    def ask(self) -> list[Arch]:
        """The architectures of the next generation (the same list until :meth:`tell` is called).

        Raises:
            RuntimeError: when the search is done, or no architecture of the first generation satisfies the
                constraint.
        """
        if self.pending is not None:
            return [list(a) for a in self.pending]
        if self.done:
            raise RuntimeError("the search is done; read .best or .top()")
        rng = np.random.default_rng([self.seed, self.generation])
        chosen: list[Arch] = []
        taken = set(self._seen)
        if self.generation > 0:
            parents = [arch for arch, _ in self.top(self.top_k)]
            self._fill(chosen, taken, self.mutations, 10 * self.mutations, lambda: self._mutate(rng, parents))
            self._fill(chosen, taken, len(chosen) + self.crossovers, 10 * self.crossovers,
                       lambda: self._crossover(rng, parents))
        self._fill(chosen, taken, self.population, self.max_random_tries, lambda: self._random(rng))
        if not chosen:
            if self.generation == 0:
                raise RuntimeError(
                    f"no architecture satisfying the constraint was found in {self.max_random_tries} random draws; "
                    "loosen the constraint"
                )
            self.exhausted = True
            return []
        self.pending = chosen
        return [list(a) for a in chosen]

    def tell(self, archs: Sequence[Sequence[int]], scores: Sequence[float]) -> None:
        """Record the scores of the generation returned by :meth:`ask` (same architectures, same order).

        Raises:
            ValueError: when ``archs`` is not the pending generation or the lengths differ.
        """
        archs = [[int(i) for i in a] for a in archs]
        if self.pending is None or archs != self.pending:
            raise ValueError("tell() needs exactly the architectures of the last ask(), in the same order")
        if len(scores) != len(archs):
            raise ValueError(f"got {len(scores)} scores for {len(archs)} architectures")
        scores = [float(s) for s in scores]
        for arch, score in zip(archs, scores):
            self.records.append((arch, score))
            self._seen.add(tuple(arch))
        top = self.top(self.top_k)
        self.history.append(
            {
                "generation": self.generation,
                "scores": scores,
                "best": top[0][1],
                "topk_mean": float(np.mean([s for _, s in top])),
            }
        )
        self.pending = None
        self.generation += 1

    def run(self, score: Callable[[Arch], float], callback: Callable[[Evolution], None] | None = None) -> Arch:
        """Run the remaining generations with ``score(arch)``; ``callback(self)`` after each. Returns the best."""
        while not self.done:
            candidates = self.ask()
            if candidates:
                self.tell(candidates, [score(a) for a in candidates])
                if callback is not None:
                    callback(self)
        return self.best[0]

    # ------------------------------------------------------------------ results
    def top(self, k: int | None = None) -> list[tuple[Arch, float]]:
        """The ``k`` best (architecture, score) pairs seen so far, best first, ties broken as the module doc says."""
        ranked = sorted(self.records, key=lambda r: (-_key(r[1], self.tie_decimals), r[0]))
        if self.tiebreak is not None:  # evaluated only inside groups of tied scores (it may be costly)
            groups = itertools.groupby(ranked, key=lambda r: _key(r[1], self.tie_decimals))
            tied = [list(g) for _, g in groups]
            ranked = [r for g in tied for r in (sorted(g, key=lambda r: (-self._secondary(r[0]), r[0])) if len(g) > 1 else g)]
        return [(list(a), s) for a, s in ranked[: k or len(ranked)]]

    def _secondary(self, arch: Arch) -> float:
        key = tuple(arch)
        if key not in self._tiebreaks:
            value = float(self.tiebreak(list(arch)))
            self._tiebreaks[key] = -math.inf if math.isnan(value) else value
        return self._tiebreaks[key]

    @property
    def best(self) -> tuple[Arch, float]:
        """The best architecture seen and its score.

        Raises:
            RuntimeError: before the first generation was told.
        """
        if not self.records:
            raise RuntimeError("no architecture has been scored yet")
        return self.top(1)[0]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: plain lists and numbers (JSON- and torch.save-able)."""
        return {
            "generation": self.generation,
            "records": [[list(a), s] for a, s in self.records],
            "history": [dict(h) for h in self.history],
            "pending": None if self.pending is None else [list(a) for a in self.pending],
            "exhausted": self.exhausted,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: when the state was saved by a search with another space, seed or settings.
        """
        if state.get("config") != self._config():
            raise ValueError(
                f"search state does not match this search: saved {state.get('config')}, current {self._config()}"
            )
        self.generation = int(state["generation"])
        self.records = [([int(i) for i in a], float(s)) for a, s in state["records"]]
        self.history = [dict(h) for h in state["history"]]
        self.pending = None if state["pending"] is None else [[int(i) for i in a] for a in state["pending"]]
        self.exhausted = bool(state["exhausted"])
        self._seen = {tuple(a) for a, _ in self.records}

    def _config(self) -> dict[str, Any]:
        return {
            "options": self.options, "population": self.population, "top_k": self.top_k,
            "mutations": self.mutations, "mutation_prob": self.mutation_prob, "crossovers": self.crossovers,
            "generations": self.generations, "seed": self.seed, "tie_decimals": self.tie_decimals,
        }

    # ------------------------------------------------------------------ operators
    def _random(self, rng: np.random.Generator) -> Arch:
        return [opts[int(rng.integers(len(opts)))] for opts in self.options]

    def _mutate(self, rng: np.random.Generator, parents: list[Arch]) -> Arch:
        child = list(parents[int(rng.integers(len(parents)))])
        for i, opts in enumerate(self.options):
            if rng.random() < self.mutation_prob:
                child[i] = opts[int(rng.integers(len(opts)))]
        return child

    def _crossover(self, rng: np.random.Generator, parents: list[Arch]) -> Arch:
        a = parents[int(rng.integers(len(parents)))]
        b = parents[int(rng.integers(len(parents)))]
        return [x if rng.random() < 0.5 else y for x, y in zip(a, b)]

    def _fill(self, chosen: list[Arch], taken: set, target: int, tries: int, draw: Callable[[], Arch]) -> None:
        """Append new, feasible draws to ``chosen`` until it has ``target`` entries or ``tries`` run out."""
        while len(chosen) < target and tries > 0:
            tries -= 1
            arch = draw()
            if self.canonical is not None:  # one spelling per network: duplicates differing in unused genes skipped
                arch = [int(i) for i in self.canonical(list(arch))]
            key = tuple(arch)
            if key in taken or (self.constraint is not None and not self.constraint(list(arch))):
                continue
            taken.add(key)
            chosen.append(arch)


def progress_figure(history: Sequence[dict[str, Any]], metric: str = "score") -> Any:
    """A matplotlib picture of a search: every candidate's score per generation, the best so far, the top-k mean."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for h in history:
        scores = np.array(h["scores"], dtype=float)
        ax.scatter(np.full(len(scores), h["generation"]), scores, s=6, alpha=0.35, color="tab:gray")
    gens = [h["generation"] for h in history]
    ax.plot(gens, [h["best"] for h in history], "-o", ms=3, color="tab:red", label="best so far")
    ax.plot(gens, [h["topk_mean"] for h in history], "-", color="tab:blue", label="top-k mean")
    ax.set_xlabel("generation")
    ax.set_ylabel(metric)
    ax.set_title("evolutionary search")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
