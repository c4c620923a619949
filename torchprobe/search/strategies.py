"""Search strategies over sets of modules: propose a set, learn pass/fail, stop when done.

    >>> search = MinimalSetSearch(["a", "b", "c", "d"])      # keeping all four passes
    >>> while not search.done:
    ...     search.step("c" in search.proposal)              # only c matters
    >>> sorted(search.result), search.steps
    (['c'], 4)
"""
from __future__ import annotations

import math
from typing import Generator, Sequence

Search = Generator[frozenset, bool, frozenset]


def _minimize(candidates: tuple[str, ...], base: frozenset) -> Search:
    """Smallest subset S of candidates with pass(base | S), given pass(base | candidates)."""
    if len(candidates) <= 1:
        return frozenset(candidates)
    half = len(candidates) // 2
    first, second = candidates[:half], candidates[half:]
    if (yield base | frozenset(first)):
        return (yield from _minimize(first, base))
    if (yield base | frozenset(second)):
        return (yield from _minimize(second, base))
    kept_first = yield from _minimize(first, base | frozenset(second))
    kept_second = yield from _minimize(second, base | kept_first)
    return kept_first | kept_second


class MinimalSetSearch:
    """Adaptive group testing over arbitrary subsets (not prefixes): keep one half in FP32; if
    that passes recurse into it, else try the other half; if neither half alone passes, minimize
    each half with the other kept. ``proposal`` is the set to try next; ``step(passed)`` returns
    True when done; ``result`` then holds the minimal set. Requires that keeping every candidate
    passes. For a single culprit among ``m`` candidates: at most ``2*ceil(log2 m)`` steps.
    """

    def __init__(self, candidates: Sequence[str]):
        self.candidates = tuple(candidates)
        self._search = _minimize(self.candidates, frozenset())
        self.result: frozenset | None = None
        self.proposal: frozenset | None = None
        self.steps = 0
        self._advance(None)

    def _advance(self, passed: bool | None) -> bool:
        try:
            self.proposal = next(self._search) if passed is None else self._search.send(passed)
            return False
        except StopIteration as stop:
            self.result, self.proposal = stop.value, None
            return True

    @property
    def done(self) -> bool:
        return self.result is not None

    def step(self, passed: bool) -> bool:
        self.steps += 1
        return self._advance(passed)

    def remaining(self) -> int:
        """Upper bound on evaluations left for a single culprit: two per halving."""
        return 0 if self.done else 2 * math.ceil(math.log2(max(len(self.proposal or ()), 2)))


def single_culprit_bound(candidates: int) -> int:
    """Full-model evaluations bisect makes at most for one culprit among ``candidates``:
    before, all candidates, then two per halving (plus the final verification, cached)."""
    return 2 + 2 * math.ceil(math.log2(max(candidates, 1)))
