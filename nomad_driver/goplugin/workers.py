"""The gRPC server's threads: made as calls need them, up to a bound, and each gone once it has
had nothing to do for a while.

Nomad holds two long calls per task (WaitTask, TaskStats), so a node that ran 200 tasks at once
needed 400 threads. concurrent.futures.ThreadPoolExecutor keeps every thread it ever made, and
with it the stack pages and interpreter state each touched: the driver stayed 17 MB larger after
a burst of 100 tasks had ended (bench/results/memory.md). These threads leave after idle_s."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

Work = tuple[futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ElasticExecutor(futures.Executor):
    def __init__(self, max_workers: int, idle_s: float = 10.0, name: str = "worker") -> None:
        self.max_workers, self.idle_s, self.name = max_workers, idle_s, name
        self._lock = threading.Lock()
        # Work promised to an idle thread (submit counted it off _idle), taken only by threads
        # counted idle; and work waiting for any thread once max_workers are busy, taken by a
        # thread as it finishes. Kept apart, so no busy thread takes what an idle one was
        # promised (and the count of idle threads stays true).
        self._promised: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._backlog: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._idle = 0  # threads waiting for work that submit has not yet promised any
        self._threads = 0
        self._made = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        work: Work = (future, fn, args, kwargs)
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            if self._idle:
                self._idle -= 1
                self._promised.put(work)
            elif self._threads < self.max_workers:
                self._threads += 1
                self._made += 1
                thread = threading.Thread(
                    target=self._work, args=(work,), name=f"{self.name}_{self._made}", daemon=True
                )
                thread.start()
            else:
                self._backlog.put(work)
        return future

    def _work(self, first: Work | None) -> None:
        work = first
        while True:
            if work is not None:
                _run(work)
                work = None
            with self._lock:
                try:
                    work = self._backlog.get_nowait()
                    continue
                except queue.Empty:
                    self._idle += 1
            try:
                work = self._promised.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    try:  # promised to an idle thread just as this one gave up: take it
                        work = self._promised.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        self._threads -= 1
                        return

    def threads(self) -> int:
        with self._lock:
            return self._threads

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True


def _run(work: Work) -> None:
    future, fn, args, kwargs = work
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
        future.set_exception(error)
    else:
        future.set_result(result)
