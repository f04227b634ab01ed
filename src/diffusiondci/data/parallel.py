"""Ordered, bounded thread-pool map for the pixel work of ``prepare`` and colour statistics.

Reading tiles (``os.pread`` + imagecodecs), the CIELAB maths (numpy) and Pillow's resizing all
release the GIL, so threads use every core without copying pixels between processes. At most
``2 * workers`` items are in flight, so memory stays bounded by a few items (tiles or ROIs)
however long the input is; results come back in input order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["MAX_WORKERS", "default_workers", "map_ordered"]

T = TypeVar("T")
R = TypeVar("R")

#: Upper bound of the default worker count (each worker holds one tile or ROI: ~40 MB at 3450 px).
MAX_WORKERS = 8


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask), at most :data:`MAX_WORKERS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads (default :func:`default_workers`), in order.

    With one worker everything runs in the calling thread. An exception in ``fn`` is raised here,
    for the first item that failed, after the items already submitted have stopped.
    """
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffusiondci") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
