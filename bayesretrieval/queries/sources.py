"""Choosing, read by read, the cheaper of interchangeable ways to read the same data.

The rerank needs each candidate's stored mean, and an index offers it two ways that give
the same bits: ``means.npy`` (random rows of a memory-mapped file) and the FAISS lists
the search has just scanned (:class:`~bayesretrieval.store.reader.IndexedMeans`). Which
is cheaper depends on the machine, not on the data. On one VM, rows of the file read
after a FAISS search cost 11.7-51.8 ms per 1,000 against 3.3-14.2 ms from the lists; on
another, 0.6-0.9 ms against 2.0-2.5 ms (``benchmarks/search_speed.py``, its mean-fetch
probe). So the engine times both and reads from the one that is cheaper here and now.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Sequence

PROBE_INTERVAL = 31
"""Reads between two re-timings of a source not in use. Odd, so that searches that read
twice (``lcb``'s two rerank stages) re-time either stage in turn."""
SMOOTHING = 0.25
"""Weight of the newest timing in the running cost of the source in use."""


class CheaperSource:
    """Picks the source with the least measured seconds per row, re-timing the others now and then.

    Every source is timed first (in the order given); after that, each read uses the
    cheapest, except every :data:`PROBE_INTERVAL`-th, which re-times the cheapest of the
    others. The source in use keeps a running average; a re-timing replaces a source's
    cost outright, so a first read inflated by page faults is forgotten.

    Args:
        names: the sources (at least one).

    Attributes:
        costs: seconds per row of each source, ``None`` until it is first timed.
        uses: reads from each source so far.
    """

    def __init__(self, names: Sequence[str]):
        if not names:
            raise ValueError("CheaperSource needs at least one source")
        self.costs: dict[str, float | None] = {name: None for name in names}
        self.uses = {name: 0 for name in names}

    def _ranked(self) -> list[str]:
        """The timed sources, cheapest first."""
        return sorted((name for name, cost in self.costs.items() if cost is not None), key=self.costs.get)

    def pick(self) -> str:
        """The source the next read should use."""
        untimed = [name for name, cost in self.costs.items() if cost is None]
        if untimed:
            return untimed[0]
        ranked = self._ranked()
        probing = len(ranked) > 1 and (sum(self.uses.values()) + 1) % PROBE_INTERVAL == 0
        return ranked[1] if probing else ranked[0]

    def record(self, name: str, seconds: float, rows: int) -> None:
        """Account a read of ``rows`` rows from ``name`` that took ``seconds``."""
        self.uses[name] += 1
        per_row = seconds / max(rows, 1)
        previous = self.costs[name]
        in_use = previous is not None and self._ranked()[0] == name
        self.costs[name] = previous + SMOOTHING * (per_row - previous) if in_use else per_row

    @contextmanager
    def timed(self, rows: int) -> Iterator[str]:
        """Pick a source for a read of ``rows`` rows and time the enclosed read."""
        name = self.pick()
        start = time.perf_counter()
        yield name
        self.record(name, time.perf_counter() - start, rows)
