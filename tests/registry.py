"""A real OCI registry for tests: Debian's docker-registry on 127.0.0.1, optionally with
htpasswd authentication, with token authentication (a token server here that signs JWTs with a
throwaway key the registry trusts, as Docker Hub's or Harbor's does), and TLS (a throwaway CA
made with openssl)."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass(frozen=True)
class RunningRegistry:
    host: str
    username: str = ""
    password: str = ""
    ca_file: str = ""
    tokens: TokenServer | None = None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A registry token service: a login in `users` gets what it asks for, anyone else a token
    to pull what lies under public/ and nothing more (as Docker Hub answers anonymous callers).
    Records what it was asked."""

    work: Path
    users: dict[str, str]
    service: str = "pyhpc-test-registry"
    issuer: str = "pyhpc-test-issuer"
    asked: list[tuple[str, str]] = field(default_factory=list)  # (user or "", scope)

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyhpc token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = self.work / "token-signer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.der = self.cert.public_bytes(serialization.Encoding.DER)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                query = parse_qs(urlparse(self.path).query)
                scope = (query.get("scope") or [""])[0]
                user = server.login(self.headers.get("Authorization", ""))
                server.asked.append((user or "", scope))
                if user is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": server.token(user, scope), "expires_in": 300})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.http.server_address[1]}/token"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def login(self, header: str) -> str | None:
        """The user of a right basic login, "" for none, None for a wrong one."""
        if not header:
            return ""
        scheme, _, raw = header.partition(" ")
        user, _, password = base64.b64decode(raw).decode().partition(":")
        return user if scheme == "Basic" and self.users.get(user) == password else None

    def token(self, user: str, scope: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        if scope.count(":") >= 2:
            kind, rest = scope.split(":", 1)
            name, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            if not user:  # anonymous callers may pull what lies under public/, nothing else
                wanted = ["pull"] if name.startswith("public/") and "pull" in wanted else []
            access.append({"type": kind, "name": name, "actions": wanted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64url(signature)}"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_registry(
    work: Path, auth: bool = False, tls: bool = False, token: bool = False, port: int = 0
) -> Iterator[RunningRegistry]:
    """auth: htpasswd logins; token: logins through a token server (both: user "tester")."""
    work.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
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
    user, password = ("tester", "s3cret-pw") if auth or token else ("", "")
    tokens = TokenServer(work, {user: password}) if token else None
    if tokens is not None:
        lines += [
            "auth:",
            "  token:",
            f"    realm: {tokens.realm}",
            f"    service: {tokens.service}",
            f"    issuer: {tokens.issuer}",
            f"    rootcertbundle: {tokens.bundle}",
        ]
    elif auth:
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
        yield RunningRegistry(f"127.0.0.1:{port}", user, password, ca, tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        if tokens is not None:
            tokens.close()
