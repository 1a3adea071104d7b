"""Gram and basis tasks hold BLAS to one thread on dask.distributed workers, whatever the worker
was started with, and give the BLAS threads back after the last concurrent task."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import threadpoolctl

from trajstore import _blas


def blas_threads() -> list[int]:
    return [int(x["num_threads"]) for x in threadpoolctl.threadpool_info() if x["user_api"] == "blas"]


def inside(_: int) -> list[int]:
    with _blas.one_thread_on_workers():
        return blas_threads()


@pytest.fixture
def several_blas_threads() -> list[int]:
    before = blas_threads()
    if not before or max(before) < 2:
        pytest.skip(f"BLAS runs {before} threads here: nothing to limit")
    return before


def test_concurrent_tasks_in_threads_all_run_single_threaded(monkeypatch: pytest.MonkeyPatch,
                                                             several_blas_threads: list[int]) -> None:
    """Limits taken in one thread and given back in another: threadpoolctl's one-controlling-
    thread rule would ignore them (the second round of tasks ran at 2 threads, and BLAS stayed at
    1 afterwards)."""
    monkeypatch.setattr(_blas, "_on_worker", lambda: True)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(4):
            assert list(pool.map(inside, range(16))) == [[1] * len(several_blas_threads)] * 16
    assert blas_threads() == several_blas_threads


def test_outside_a_worker_nothing_changes(several_blas_threads: list[int]) -> None:
    assert inside(0) == several_blas_threads


def test_a_limit_of_the_callers_own_is_kept(monkeypatch: pytest.MonkeyPatch, several_blas_threads: list[int]) -> None:
    monkeypatch.setattr(_blas, "_on_worker", lambda: True)
    with threadpoolctl.threadpool_limits(1, "blas"):
        with ThreadPoolExecutor(2) as pool:
            assert all(r == [1] * len(several_blas_threads) for r in pool.map(inside, range(8)))
        assert blas_threads() == [1] * len(several_blas_threads)
    assert blas_threads() == several_blas_threads


@pytest.mark.slow
def test_tasks_on_an_in_process_worker(several_blas_threads: list[int]) -> None:
    """A worker in this very process (no nanny, no environment): one thread inside every task,
    this process's BLAS threads back afterwards."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        results = client.gather(client.map(inside, range(16), pure=False))
    assert results == [[1] * len(several_blas_threads)] * 16
    assert blas_threads() == several_blas_threads
