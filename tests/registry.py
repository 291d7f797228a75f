"""A real OCI registry for tests: Debian's docker-registry on 127.0.0.1, optionally with
htpasswd authentication and TLS (a throwaway CA made with openssl)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunningRegistry:
    host: str
    username: str = ""
    password: str = ""
    ca_file: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_registry(work: Path, auth: bool = False, tls: bool = False) -> Iterator[RunningRegistry]:
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    lines = [
        "version: 0.1",
        "log: {level: error}",
        f"storage: {{filesystem: {{rootdirectory: {work / 'data'}}}, delete: {{enabled: true}}}}",
        "http:",
        f"  addr: 127.0.0.1:{port}",
    ]
    ca = ""
    if tls:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(work / "key.pem"),
                "-out",
                str(work / "cert.pem"),
            ],
            check=True,
            capture_output=True,
        )
        lines += ["  tls:", f"    certificate: {work / 'cert.pem'}", f"    key: {work / 'key.pem'}"]
        ca = str(work / "cert.pem")
    user, password = ("tester", "s3cret-pw") if auth else ("", "")
    if auth:
        subprocess.run(
            ["htpasswd", "-Bbc", str(work / "htpasswd"), user, password],
            check=True,
            capture_output=True,
        )
        lines += ["auth:", "  htpasswd:", "    realm: pyhpc-test", f"    path: {work / 'htpasswd'}"]
    (work / "config.yml").write_text("\n".join(lines) + "\n")
    log = open(work / "registry.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(work / "config.yml")], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"docker-registry did not start: {(work / 'registry.log').read_text()}"
                    ) from err
                time.sleep(0.1)
        yield RunningRegistry(f"127.0.0.1:{port}", user, password, ca)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
