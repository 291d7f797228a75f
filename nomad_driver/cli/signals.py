"""The signals `pyhpc run` acts on, and how it stops on one before its container starts.
Small on purpose: `pyhpc run` installs this before importing anything else of its own."""

from __future__ import annotations

import signal

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


PENDING: list[int] = []  # signals that stop the run: each stop() raised for, and those that
# found the command already ended


def check() -> None:
    """Raise for a stop not yet acted on: one whose Interrupted Python swallowed (raised where
    exceptions are only reported, "Exception ignored in ...", a callback of the import
    machinery), or one that came as the command ended."""
    if PENDING:
        raise Interrupted(PENDING[0])


class Interrupted(BaseException):
    """A signal that came before the container's start began, or after its command ended:
    the run stops where it is (what it holds is let go on the way out, as for
    KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> None:
    """From pyhpc run's first step until supervise() takes over (holding signals until the
    container's init exists, then forwarding them), and again once the command has ended: a
    signal ends the run cleanly."""

    def stop(signum: int, _frame: object) -> None:
        PENDING.append(signum)
        raise Interrupted(signum)

    for s in FORWARDED:
        signal.signal(s, stop)


def ignore() -> None:
    """Once the run is over: its exit status is decided, and a signal no longer changes it
    (blocked while the handlers change, so none lands halfway; what was pending is dropped)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    for s in FORWARDED:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
