"""The gRPC server's elastic thread pool: as many threads as calls at once (up to the bound),
results and errors handed back, and idle threads gone so a burst's memory is returned."""

from __future__ import annotations

import threading
import time

import pytest

from nomad_driver.goplugin.workers import ElasticExecutor
from tests.waiting import eventually


def test_a_burst_gets_a_thread_per_call_and_the_threads_leave_when_idle() -> None:
    pool = ElasticExecutor(64, idle_s=0.2, name="t")
    release = threading.Event()
    calls = [pool.submit(release.wait, 5) for _ in range(40)]
    assert eventually(lambda: pool.threads() == 40)  # all 40 at once: none waits for another
    assert not any(c.done() for c in calls)
    release.set()
    assert [c.result(5) for c in calls] == [True] * 40
    before = threading.active_count()
    assert eventually(lambda: pool.threads() == 0)  # the control above: they did exist
    assert eventually(lambda: threading.active_count() <= before - 40)


def test_results_errors_and_work_beyond_the_bound_all_come_back() -> None:
    pool = ElasticExecutor(3, idle_s=0.5)
    gate = threading.Event()
    busy = [pool.submit(gate.wait, 5) for _ in range(3)]
    queued = [pool.submit(lambda i=i: i * i) for i in range(20)]  # the bound is reached
    assert eventually(lambda: pool.threads() == 3)
    time.sleep(0.05)
    assert not any(q.done() for q in queued) and pool.threads() == 3
    gate.set()
    assert [q.result(5) for q in queued] == [i * i for i in range(20)]
    assert all(b.result(5) for b in busy)
    failed = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(5)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)


def test_work_handed_to_an_idle_thread_as_it_gives_up_is_never_lost() -> None:
    """Submit right at the idle timeout, many times: every call still runs."""
    pool = ElasticExecutor(4, idle_s=0.01)
    done = []
    for i in range(300):
        time.sleep(0.01 if i % 3 else 0.0)
        done.append(pool.submit(lambda i=i: i))
    assert [d.result(5) for d in done] == list(range(300))
