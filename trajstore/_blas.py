"""BLAS held to one thread while trajstore's tasks run on a dask.distributed worker.

A worker runs several tasks at once, one per thread, and each task's products are big enough
for OpenBLAS to start its own threads on top: they spin against each other and against the
reads. A worker started by a nanny has ``OPENBLAS_NUM_THREADS=1`` (and the like) in its
environment; one started with ``--no-nanny`` does not (measured on a 4M-parameter Gram pass on
one 2-thread worker: 10.9 s vs 2.9 s with a nanny). So every Gram and basis task holds BLAS to one
thread itself while it runs on a worker: process-wide (that is what BLAS libraries offer), counted
across the worker's concurrent tasks, and restored when the last of them ends, so a worker
running in the client's own process (``LocalCluster(processes=False)``) gets its BLAS back.

On the local threaded scheduler :func:`trajstore.dldr._compute_ordered` holds the limit around
the whole pass instead; tasks run outside a worker are left alone.

threadpoolctl (3.8) lets only one Python thread at a time set OpenBLAS's limits, the first one
that did, until it leaves its own ``threadpool_limits`` block; a limit taken in one worker thread
and restored in another would be ignored (measured: the worker stayed at 2 threads inside the
tasks, then stuck at 1 after them). So the limit is set on the library controllers directly,
with that ownership cleared before and after each change, under one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["one_thread_on_workers"]

_lock = threading.Lock()
_holders = 0
_original: list[tuple[Any, int]] = []


def _on_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def _set_limits(limits: list[tuple[Any, int]]) -> None:
    import threadpoolctl

    owner = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(owner, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
    for lib, n in limits:
        lib.set_num_threads(n)
    if clear is not None:
        clear(force=True)


def _blas_libraries() -> list[Any]:
    import threadpoolctl

    return list(threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers)


@contextmanager
def one_thread_on_workers() -> Iterator[None]:
    """BLAS at one thread for the body when it runs in a dask.distributed worker's task."""
    global _holders, _original
    if not _on_worker():
        yield
        return
    with _lock:
        if _holders == 0:
            libs = _blas_libraries()
            _original = [(lib, lib.get_num_threads()) for lib in libs]
            _set_limits([(lib, 1) for lib in libs])
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                original, _original = _original, []
                _set_limits([(lib, n) for lib, n in original if isinstance(n, int) and n > 0])
