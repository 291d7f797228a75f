"""File operations as the user a root process acts for (util/asuser.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from nomad_driver.util.asuser import run_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing ids needs root")


def test_the_work_runs_with_the_users_ids_and_its_errors_come_back(tmp_path: Path) -> None:
    assert run_as(65534, 65534, [65534], lambda: b"%d %d" % (os.getuid(), os.getgid())) == (
        b"65534 65534"
    )
    private = tmp_path / "private"
    private.write_text("root's")
    private.chmod(0o600)
    with pytest.raises(OSError) as err:
        run_as(65534, 65534, [65534], lambda: private.read_bytes())
    assert err.value.errno == 13
    assert run_as(0, 0, [0], lambda: private.read_bytes()) == b"root's"  # root: as itself


def test_a_signal_in_the_child_never_runs_a_handler_of_the_root_process() -> None:
    """pyhpc run's handlers raise to stop a run; in a child forked to act as the user, that
    would carry on outside work(). The child keeps signals blocked until it exits."""
    ran: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        ran.append(os.getpid())
        raise RuntimeError("a handler ran")

    def work() -> bytes:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        return b"done"

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        assert run_as(65534, 65534, [65534], work) == b"done"
        # The control: the same signal in this process runs the handler, and the mask the
        # parent had is back.
        with pytest.raises(RuntimeError):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        assert ran == [os.getpid()]
        assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGUSR1, old)
