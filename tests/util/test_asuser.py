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


def test_a_parent_that_gives_up_leaves_no_child_and_the_child_never_returns() -> None:
    """The root process stops (a signal) while the child works: the child is ended and
    reaped; it never goes on past run_as as the user (red team: EPIPE carried it out)."""
    import threading

    def stop(signum: int, _frame: object) -> None:
        raise InterruptedError("stopped")

    def work() -> bytes:
        time.sleep(0.5)
        return b"x" * (1 << 20)  # more than a pipe holds: the write meets the parent gone

    me = os.getpid()
    before = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    old = signal.signal(signal.SIGUSR2, stop)
    try:
        threading.Timer(0.1, os.kill, (me, signal.SIGUSR2)).start()
        with pytest.raises(InterruptedError):
            run_as(65534, 65534, [65534], work)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert os.getpid() == me  # (a child that escaped would be here, running the tests)
    time.sleep(0.6)
    children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    assert children == before, (children, before)  # the child ended and was reaped


def test_an_interrupted_cache_write_leaves_no_half_written_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nomad_driver.util import rootcache

    def stopped(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rootcache.os, "fsync", stopped)
    with pytest.raises(KeyboardInterrupt):
        rootcache.write("entry", b"data", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    rootcache.write("entry", b"data", str(tmp_path))  # the control: written, whole
    assert (tmp_path / "entry").read_bytes() == b"data"


@pytest.mark.parametrize("o_tmpfile", [True, False], ids=["O_TMPFILE", "no-O_TMPFILE"])
def test_a_new_file_cut_short_is_not_left_half_written(
    monkeypatch: pytest.MonkeyPatch, o_tmpfile: bool
) -> None:
    """`pyhpc run --save` stopped while the image is written as the caller: the child is
    killed, so it cannot remove what it made; the file is named only once complete (red team:
    truncated images were left in the caller's directory), also where the filesystem has no
    O_TMPFILE (NFS, red team: there the fallback left them)."""
    from nomad_driver.util.asuser import write_new_as

    if not o_tmpfile:  # as NFS answers (the child, forked with this patch, sees it too)
        real_open = os.open

        def no_tmpfile(path: str, flags: int, *args: object, **kw: object) -> int:
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(95, "Operation not supported")
            return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", no_tmpfile)

    source = os.memfd_create("source")
    os.write(source, b"image bytes " * 1000)
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="pyhpc-asuser-"))  # a directory the user can reach
    where.chmod(0o777)
    target = where / "saved.sqsh"

    def slow_disk(fd: int) -> None:  # in the child (forked with this patch): a long fsync
        time.sleep(5)

    def stop(signum: int, _frame: object) -> None:
        raise InterruptedError("stopped")

    import threading

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", slow_disk)
    old = signal.signal(signal.SIGUSR2, stop)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR2)).start()
        with pytest.raises(InterruptedError):
            write_new_as(str(target), source, 65534, 65534, [65534])
    finally:
        signal.signal(signal.SIGUSR2, old)
    try:
        assert list(where.iterdir()) == []
        monkeypatch.setattr(os, "fsync", real_fsync)
        write_new_as(str(target), source, 65534, 65534, [65534])  # the control: whole, the user's
        assert target.read_bytes() == b"image bytes " * 1000 and target.stat().st_uid == 65534
        with pytest.raises(OSError) as err:  # and never over a file
            write_new_as(str(target), source, 65534, 65534, [65534])
        assert err.value.errno == 17
        assert sorted(p.name for p in where.iterdir()) == ["saved.sqsh"]  # no hidden name left
    finally:
        os.close(source)
        shutil.rmtree(where)
