"""Counted warnings for input records that are skipped rather than allowed to stop a run."""

from __future__ import annotations

import collections
import logging
import threading

logger = logging.getLogger("m2jax.data")


class SkipLog:
    """Thread-safe per-reason counters; logs the first few skips of each reason in full, then
    every power of ten, so a corrupt dataset is visible without flooding the log.

    `counts` maps reason -> number skipped; `examples` keeps the first locations (file:line or
    dataset[index]) per reason.
    """

    def __init__(self, name: str, verbose_first: int = 5):
        self.name = name
        self.verbose_first = verbose_first
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def skip(self, reason: str, where: str) -> None:
        with self._lock:
            self.counts[reason] += 1
            n = self.counts[reason]
            if n <= self.verbose_first:
                self.examples.setdefault(reason, []).append(where)
        if n <= self.verbose_first or _is_power_of_ten(n):
            logger.warning("%s: skipped %s (%s); %d skipped for this reason so far",
                           self.name, where, reason, n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
