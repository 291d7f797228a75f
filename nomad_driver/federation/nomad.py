"""The one Nomad HTTP client of pyhpc (dispatch, job sync, the tests): settings read as Nomad's
own CLI reads them (NOMAD_ADDR, NOMAD_TOKEN, NOMAD_REGION, NOMAD_NAMESPACE, NOMAD_CACERT,
NOMAD_CAPATH, NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY, NOMAD_TLS_SERVER_NAME, NOMAD_SKIP_VERIFY, and
the same -flags), mutual TLS, connection retries, and errors as one line that names Nomad, the
address, the region and namespace, and what to check. requests is imported only by a client
made: every `pyhpc` command builds its flags from here, and `pyhpc run` must not pay 100 ms of
HTTP imports it never uses."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import quote

from nomad_driver.util.errors import PyhpcError

DEFAULT_ADDRESS = "http://127.0.0.1:4646"
# What a Nomad agent answers (HTTP 500) when it cannot reach another region's servers.
TRANSPORT = (
    "failed to get conn",
    "connection refused",
    "stream closed",
    "No cluster leader",
    "i/o timeout",
    "rpc error: EOF",
    "No path to region",
)


class NomadError(PyhpcError, RuntimeError):
    """A call Nomad refused or could not answer. status: the HTTP status (0: no answer);
    unreachable: the region (or the agent itself) could not be reached, so another region may
    still serve."""

    def __init__(self, message: str, status: int = 0, unreachable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.unreachable = unreachable


@dataclass(frozen=True)
class Settings:
    """Where Nomad is and how to talk to it; each field is the Nomad CLI's flag of its name
    (`-ca-cert` for ca_cert) and environment variable (NOMAD_CACERT)."""

    address: str = DEFAULT_ADDRESS
    token: str = ""
    region: str = ""
    namespace: str = ""
    ca_cert: str = ""
    ca_path: str = ""
    client_cert: str = ""
    client_key: str = ""
    tls_server_name: str = ""
    tls_skip_verify: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = environ.get(ENV[field.name], "")
            if not raw:
                continue
            values[field.name] = (
                raw.lower() in ("1", "true", "yes") if field.type == "bool" else raw
            )
        return cls(**values)

    def where(self, region: str | None = None) -> str:
        """'Nomad at ADDRESS (region R, namespace N)', for messages."""
        scope = [
            f"region {region if region is not None else self.region or 'of the agent'}",
            *([f"namespace {self.namespace}"] if self.namespace else []),
        ]
        return f"Nomad at {self.address} ({', '.join(scope)})"


ENV = {
    "address": "NOMAD_ADDR",
    "token": "NOMAD_TOKEN",
    "region": "NOMAD_REGION",
    "namespace": "NOMAD_NAMESPACE",
    "ca_cert": "NOMAD_CACERT",
    "ca_path": "NOMAD_CAPATH",
    "client_cert": "NOMAD_CLIENT_CERT",
    "client_key": "NOMAD_CLIENT_KEY",
    "tls_server_name": "NOMAD_TLS_SERVER_NAME",
    "tls_skip_verify": "NOMAD_SKIP_VERIFY",
}


def add_flags(parser: argparse.ArgumentParser, region: bool = True) -> None:
    """Nomad's connection flags, spelled as its CLI spells them (-address; --address works too).
    region=False: the command declares its own --region (dispatch takes several)."""
    group = parser.add_argument_group("Nomad connection (flags override the NOMAD_* variables)")
    for name, env in ENV.items():
        if name == "region" and not region:
            continue
        flag = name.replace("_", "-")
        if name == "tls_skip_verify":
            group.add_argument(
                f"-{flag}", f"--{flag}", dest=f"nomad_{name}", action="store_true",
                default=None, help=f"do not verify the agent's certificate (${env})",
            )  # fmt: skip
            continue
        group.add_argument(
            f"-{flag}", f"--{flag}", dest=f"nomad_{name}", metavar=name.upper(),
            help=f"(default ${env})",
        )  # fmt: skip


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """The environment's settings with the flags given on top."""
    base = Settings.from_env(environ)
    given = {
        f.name: getattr(args, f"nomad_{f.name}")
        for f in fields(Settings)
        if getattr(args, f"nomad_{f.name}", None) not in (None, "")
    }
    return replace(base, **given)


class Nomad:
    """Calls to Nomad's HTTP API. A refused connection or a reset is tried again twice (with
    backoff) before the agent counts as unreachable; an answer is never repeated."""

    def __init__(self, settings: Settings | str = DEFAULT_ADDRESS, timeout: float = 10.0) -> None:
        import requests
        from urllib3.util.retry import Retry

        self.settings = settings if isinstance(settings, Settings) else Settings(address=settings)
        self.address = self.settings.address.rstrip("/")
        self.timeout = timeout
        s = self.settings
        self.session = requests.Session()
        self.session.trust_env = False  # NOMAD_* decide; no proxy between us and the agent
        if s.token:
            self.session.headers["X-Nomad-Token"] = s.token
        self.session.verify = False if s.tls_skip_verify else (s.ca_cert or s.ca_path or True)
        if s.client_cert:
            self.session.cert = (s.client_cert, s.client_key) if s.client_key else s.client_cert
        adapter = _adapter(
            s.tls_server_name,
            max_retries=Retry(total=2, connect=2, read=0, status=0, backoff_factor=0.2),
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def call(self, method: str, path: str, region: str | None = None, **kw: Any) -> Any:
        """One API call; region None means the settings' region (or the agent's own)."""
        import requests

        region = self.settings.region if region is None else region
        raw = kw.pop("raw", False)
        params = {"region": region} if region else {}
        if self.settings.namespace:
            params["namespace"] = self.settings.namespace
        params.update(kw.pop("params", {}))
        where = self.settings.where(region or None)
        try:
            reply = self.session.request(
                method, f"{self.address}{path}", params=params or None, timeout=self.timeout, **kw
            )
        except requests.exceptions.SSLError as err:
            raise NomadError(
                f"{where}: TLS failed ({_reason(err)}); check NOMAD_CACERT/-ca-cert, and "
                "NOMAD_CLIENT_CERT/NOMAD_CLIENT_KEY where the agent verifies clients",
                unreachable=True,
            ) from err
        except requests.RequestException as err:
            raise NomadError(
                f"{where}: unreachable ({_reason(err)}); check NOMAD_ADDR/-address and that "
                "the agent runs",
                unreachable=True,
            ) from err
        if reply.status_code >= 400:
            text = " ".join(reply.text.split())[:200]
            if reply.status_code >= 500 and any(t in text for t in TRANSPORT):
                raise NomadError(f"{where}: unreachable ({text})", reply.status_code, True)
            hint = ""
            if reply.status_code == 403:
                hint = "; the ACL token (NOMAD_TOKEN/-token) lacks the capability" + (
                    f" in namespace {self.settings.namespace}" if self.settings.namespace else ""
                )
            raise NomadError(
                f"{where}: {method} {path}: HTTP {reply.status_code} {text}{hint}",
                reply.status_code,
            )
        if raw:
            return reply.text
        return reply.json() if reply.content else None

    def regions(self) -> list[str]:
        return list(self.call("GET", "/v1/regions", ""))

    def home(self) -> str:
        """The region of the agent at address; "" (which every call takes as the agent's own
        region) where the token may not read the agent (agent:read is not for every user)."""
        try:
            return str(self.call("GET", "/v1/agent/self", "")["config"]["Region"])
        except NomadError as err:
            if err.status == 403:
                return ""
            raise

    def job(self, job: str, region: str | None = None) -> dict[str, Any] | None:
        """The job, or None where the region (in the settings' namespace) has none."""
        try:
            found: dict[str, Any] = self.call("GET", f"/v1/job/{quote(job, safe='')}", region)
        except NomadError as err:
            if err.status == 404:
                return None
            raise
        return found


def _adapter(server_name: str, **kw: Any) -> Any:
    """An HTTPAdapter that checks the agent's certificate against server_name when one is set
    (Nomad's servers present server.<region>.nomad)."""
    from requests.adapters import HTTPAdapter

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **pool: Any) -> None:
            if server_name:
                pool["server_hostname"] = server_name
                pool["assert_hostname"] = server_name
            super().init_poolmanager(*args, **pool)

    return Adapter(**kw)


def _reason(err: Exception) -> str:
    """The innermost cause of a requests error, in a few words (not urllib3's repr chain)."""
    cause: BaseException = err
    while True:
        inner = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    text = str(cause)
    for noise in ("<urllib3.connection.HTTPConnection object at", "Failed to establish"):
        if noise in text and ":" in text:
            text = text.rsplit(":", 1)[1]
    return " ".join(text.split())[:160] or type(cause).__name__
