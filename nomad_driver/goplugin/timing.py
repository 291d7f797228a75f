"""PYHPC_RPC_TIMING=DIR (a diagnostic, off by default): time every unary RPC the plugin
serves. Each SIGUSR1 writes DIR/<pid>.json: [[method, wall-clock start, seconds], ...] for
the last 500,000 calls (bench/scale.py reads it). Streams are not timed: they last as long as
a task or a stats subscription does."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

KEEP = 500_000
log = logging.getLogger("pyhpc.goplugin")


class Timing(grpc.ServerInterceptor):
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"{os.getpid()}.json")
        self.calls: deque[tuple[str, float, float]] = deque(maxlen=KEEP)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, details.method
        calls = self.calls

        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            started, t0 = time.time(), time.perf_counter()
            try:
                return inner(request, context)
            finally:
                calls.append((method, started, time.perf_counter() - t0))

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def dump(self, *_: object) -> None:
        """Write the calls out; a directory that cannot take them is logged, never raised
        (this runs as a signal handler, in the plugin's main thread)."""
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(list(self.calls), f)
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("PYHPC_RPC_TIMING: cannot write %s: %s", self.path, err)


def from_env() -> list[grpc.ServerInterceptor]:
    """The interceptors PYHPC_RPC_TIMING asks for (none without it); SIGUSR1 dumps."""
    directory = os.environ.get("PYHPC_RPC_TIMING")
    if not directory:
        return []
    timing = Timing(directory)
    signal.signal(signal.SIGUSR1, timing.dump)
    return [timing]
