"""Registry pulls ride out what networks and registries do (dropped connections, 429 with
Retry-After, 503, a blob cut off half-way), resume blobs with Range requests, stop within the
pull timeout, and fail in one line naming the registry, the reference and what failed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_driver.images import publish
from nomad_driver.images.registry import Registry
from nomad_driver.images.store import Store, StoreError
from tests.images.flaky import flaky_proxy
from tests.images.ocitools import layer_tar, write_layout
from tests.registry import RunningRegistry, run_registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="imports keep ownership: root")
CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}
REPO = "team/flaky"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A private registry holding team/flaky:1 (three layers, the biggest 256 KiB of noise)."""
    work = tmp_path_factory.mktemp("flaky")
    layers = [
        layer_tar([("noise", "file", os.urandom(256 << 10))]),
        layer_tar([("etc/hostname", "file", b"flaky\n")]),
        layer_tar([("etc/motd", "file", b"hello\n")]),
    ]
    layout = write_layout(work / "layout", layers, CONFIG, tag="1")
    with run_registry(work / "registry") as reg:
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:1",
                f"docker://{reg.host}/{REPO}:1",
            ],
            check=True,
            capture_output=True,
        )
        yield reg


def expected_digest(reg: RunningRegistry, tmp: Path) -> str:
    return Store(str(tmp / "direct")).ensure(f"docker://{reg.host}/{REPO}:1").digest


def one_line(message: str) -> None:
    assert "\n" not in message and "HTTPConnectionPool" not in message, message
    assert "object at 0x" not in message and "{" not in message, message


def test_drops_429_503_and_cut_blobs_are_ridden_out_with_range_resumes(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    want = expected_digest(registry, tmp_path)
    faults = ["drop", "429", "503", "drop", "cut", "503", "cut", "cut"]
    with flaky_proxy(registry.host, faults) as proxy:
        client = Registry(proxy.host, backoff=0.05)
        said: list[str] = []
        got = Store(str(tmp_path / "store")).ensure(
            f"docker://{proxy.host}/{REPO}:1", said.append, registry=client
        )
    assert got.digest == want  # the same image as a clean pull
    assert proxy.faults == []  # every fault was met
    resumed = [s for s in proxy.seen if s.range]
    assert len(resumed) >= 3 and all(s.status == 206 for s in resumed), proxy.seen
    assert all(s.range.startswith("bytes=") and s.range != "bytes=0-" for s in resumed)
    busy = next(i for i, s in enumerate(proxy.seen) if s.fault == "429")
    waited = proxy.seen[busy + 1].at - proxy.seen[busy].at
    assert waited >= 0.95, f"Retry-After: 1 was not honoured ({waited:.2f}s)"
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_a_registry_that_ignores_ranges_is_read_again_and_skipped(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    want = expected_digest(registry, tmp_path)
    with flaky_proxy(registry.host, ["cut", "cut"], ranges=False) as proxy:
        got = Store(str(tmp_path / "store")).ensure(
            f"docker://{proxy.host}/{REPO}:1", registry=Registry(proxy.host, backoff=0.05)
        )
    assert got.digest == want
    again = [s for s in proxy.seen if s.range]
    assert again and all(s.status == 200 for s in again), proxy.seen  # whole, then skipped


@pytest.mark.parametrize("fault", ["503", "drop", "429"])
def test_a_registry_that_keeps_failing_ends_within_the_pull_timeout_in_one_line(
    registry: RunningRegistry, tmp_path: Path, fault: str
) -> None:
    with flaky_proxy(registry.host, forever=fault) as proxy:
        ref = f"docker://{proxy.host}/{REPO}:1"
        started = time.monotonic()
        with pytest.raises(StoreError) as failed:
            Store(str(tmp_path / "store")).ensure(
                ref, registry=Registry(proxy.host, backoff=0.2), pull_timeout=3.0
            )
        took = time.monotonic() - started
    message = str(failed.value)
    one_line(message)
    assert took < 4.0, f"{took:.1f}s for a 3s pull timeout"
    assert message.startswith(f"importing {ref}: registry {proxy.host}: manifest {REPO}:1: ")
    assert "(pull timeout 3s)" in message, message
    assert {"503": "HTTP 503 (Service Unavailable)", "drop": "connection was dropped"}.get(
        fault, "HTTP 429"
    ) in message, message
    assert len(proxy.seen) >= 2  # it did retry
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_a_blob_that_keeps_breaking_off_fails_naming_the_blob(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    with flaky_proxy(registry.host, forever="empty") as proxy:
        ref = f"docker://{proxy.host}/{REPO}:1"
        with pytest.raises(StoreError) as failed:
            Store(str(tmp_path / "store")).ensure(
                ref, registry=Registry(proxy.host, backoff=0.05, retries=2)
            )
    message = str(failed.value)
    one_line(message)
    assert f"importing {ref}: registry {proxy.host}: blob sha256:" in message
    assert "the connection was dropped" in message and "gave up after 3 attempts" in message


def test_missing_images_and_unreachable_registries_fail_in_one_line(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    store = Store(str(tmp_path / "store"))
    missing = f"docker://{registry.host}/{REPO}-nope:1"
    with pytest.raises(StoreError) as failed:
        store.ensure(missing)
    one_line(str(failed.value))
    assert str(failed.value) == (
        f"importing {missing}: registry {registry.host}: manifest {REPO}-nope:1: "
        "HTTP 404 (manifest unknown)"
    )
    with flaky_proxy(registry.host) as proxy:
        closed = proxy.host  # nothing listens there once the proxy is gone
    nowhere = f"docker://{closed}/{REPO}:1"
    with pytest.raises(StoreError) as refused:
        store.ensure(nowhere, registry=Registry(closed, backoff=0.05), pull_timeout=1.0)
    one_line(str(refused.value))
    assert f"importing {nowhere}: registry {closed}: manifest {REPO}:1: connection refused" in str(
        refused.value
    )


def test_an_oras_artifact_pulled_as_docker_says_to_use_oras(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    store = Store(str(tmp_path / "store"))
    image = store.ensure(f"docker://{registry.host}/{REPO}:1")
    publish.push(image, f"oras://{registry.host}/{REPO}-sqsh:1")
    wrong = f"docker://{registry.host}/{REPO}-sqsh:1"
    with pytest.raises(StoreError) as failed:
        Store(str(tmp_path / "other")).ensure(wrong)
    message = str(failed.value)
    assert "this is an oras:// artifact" in message and "truncated" not in message
    assert message.endswith(f"use oras://{registry.host}/{REPO}-sqsh:1"), message
    with pytest.raises(StoreError, match=f"for a container image use docker://{registry.host}/"):
        Store(str(tmp_path / "other")).ensure(f"oras://{registry.host}/{REPO}:1")
    pulled = Store(str(tmp_path / "other")).ensure(f"oras://{registry.host}/{REPO}-sqsh:1")
    assert pulled.digest == image.digest  # the control: oras:// pulls it


def test_the_cli_import_stops_at_its_pull_timeout_with_one_line(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    with flaky_proxy(registry.host, forever="503") as proxy:
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "nomad_driver.cli.main",
                "image",
                "--store",
                str(tmp_path / "store"),
                "import",
                "--pull-timeout",
                "2s",
                f"docker://{proxy.host}/{REPO}:1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
    assert done.returncode == 1 and took < 10, (took, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"pyhpc image: importing docker://{proxy.host}/{REPO}:1: ")
    assert "HTTP 503" in lines[0] and "(pull timeout 2s)" in lines[0]


def test_a_registry_that_trickles_a_blob_is_given_up_under_the_speed_floor(
    registry: RunningRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry sending a blob a little at a time (each read succeeds, so no socket timeout
    fires) would hold the import, and its reference's lock, for as long as it liked: under
    the floor (here 32 KiB/s over 2 s, in place of 10 KiB/s over 60 s) the pull ends, naming
    the blob. The control: the same proxy at full speed, with the same floor, imports."""
    from nomad_driver.images import registry as registry_module

    monkeypatch.setattr(registry_module, "SLOW_WINDOW", 2.0)
    monkeypatch.setattr(registry_module, "SLOW_BYTES", 64 << 10)
    with flaky_proxy(registry.host) as proxy:
        assert Store(str(tmp_path / "control")).ensure(f"docker://{proxy.host}/{REPO}:1").digest
    with flaky_proxy(registry.host, forever="trickle") as proxy:
        ref = f"docker://{proxy.host}/{REPO}:1"
        started = time.monotonic()
        with pytest.raises(StoreError) as failed:
            Store(str(tmp_path / "store")).ensure(ref, registry=Registry(proxy.host, retries=0))
        took = time.monotonic() - started
    message = str(failed.value)
    one_line(message)
    assert f"registry {proxy.host}: blob sha256:" in message and "too slow" in message
    assert took < 20, took  # 256 KiB at 4 KiB/s would take a minute
