"""A real Vault dev server on a free loopback port, from the test bed's build."""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests

TOKEN = "root"


def vault_binary() -> str:
    """The test bed's Vault build; a test that needs it is skipped, saying why, where there is
    none (CI builds it first, and fails rather than skips: CI=true)."""
    found = sorted(glob.glob(os.path.expanduser("~/.cache/pyhpc/testbed/vault-*/vault")))
    if not found:
        why = "no Vault build: run scripts/testbed/build.sh vault"
        if os.environ.get("CI") == "true":
            raise RuntimeError(why)
        import pytest

        pytest.skip(why)
    return found[-1]


@contextmanager
def dev_vault(tls_dir: str = "") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A dev server; with tls_dir, over TLS with a CA Vault makes there (tls_dir/vault-ca.pem)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"{'https' if tls_dir else 'http'}://127.0.0.1:{port}"
    tls = ["-dev-tls", f"-dev-tls-cert-dir={tls_dir}"] if tls_dir else []
    proc = subprocess.Popen(
        [
            vault_binary(),
            "server",
            "-dev",
            *tls,
            f"-dev-root-token-id={TOKEN}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ca: bool | str = os.path.join(tls_dir, "vault-ca.pem") if tls_dir else True
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = requests.get(f"{address}/v1/sys/health", timeout=1, verify=ca)
                if health.status_code == 200:
                    break
            except (requests.RequestException, OSError):  # OSError: its CA not written yet
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Vault dev server did not start")
            time.sleep(0.2)
        yield address, proc
    finally:
        proc.kill()
        proc.wait()
