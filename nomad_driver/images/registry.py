"""A small client of the OCI distribution API (v2): manifests and blobs, pulled and pushed,
with bearer-token and basic authentication. The one seam through which pyhpc reaches a registry.

Registries and the networks in front of them fail now and then: a refused or dropped
connection, 429 Too Many Requests, a 5xx from a proxy. Each request is retried by urllib3's
Retry (exponential backoff with jitter, Retry-After honoured), a blob whose connection drops
mid-way is picked up where it stopped with an HTTP Range request, and a pull timeout bounds
the retrying: no retry starts, and no wait is slept, past it. Failures come out as one line
naming the registry and what failed, never a urllib3 dump or a raw error body.

Credentials are asked of a Keychain (credentials.py) only when the registry demands a login;
bearer tokens are kept per registry, repository scope and login until they expire, and are
never logged.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, Self, cast

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import ConnectionPool
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from nomad_driver.images.credentials import CredentialError, Credentials, Keychain
from nomad_driver.util.errors import PyhpcError

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[0], MANIFEST_TYPES[2]
CHUNK = 1 << 20
RETRY_STATUS = (429, 500, 502, 503, 504)
DEFAULT_PULL_TIMEOUT = 300.0  # as the task option image_pull_timeout's default, "5m"
# The slowest a blob may arrive: at least SLOW_BYTES in every SLOW_WINDOW seconds (10 KiB/s),
# else the pull ends. Without it, a registry sending a byte a minute would hold an import (and
# its reference's lock) for ever: every read, and so the socket timeout, succeeds.
SLOW_WINDOW = 60.0
SLOW_BYTES = 600 << 10
Progress = Callable[[int], None]


class RegistryError(PyhpcError, RuntimeError):
    """The registry refused, or answered something we cannot use; the message says what."""


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def describe(err: BaseException) -> str:
    """One line for a transport failure: what happened, never urllib3's pool and object dump."""
    chain: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop(0)
        if any(e is seen for seen in chain):
            continue
        chain.append(e)
        linked = (e.__cause__, e.__context__, getattr(e, "reason", None))  # reason: maybe text
        todo += [x for x in linked if isinstance(x, BaseException)]
        todo += [a for a in e.args if isinstance(a, BaseException)]

    def first(*kinds: type[BaseException]) -> BaseException | None:
        return next((e for e in chain if isinstance(e, kinds)), None)

    if (cert := first(ssl.SSLCertVerificationError)) is not None:
        why = getattr(cert, "verify_message", "") or "verification failed"
        return f"TLS: the registry's certificate is not trusted ({why})"
    if (tls := first(ssl.SSLError)) is not None:
        return f"TLS failed ({getattr(tls, 'reason', '') or tls})"
    if first(ConnectionRefusedError):
        return "connection refused"
    if first(socket.gaierror):
        return "host name not found"
    if first(urllib3.exceptions.ReadTimeoutError):
        return "no answer in time (read timeout)"
    connect = next(
        (
            e
            for e in chain
            if isinstance(e, urllib3.exceptions.ConnectTimeoutError)
            and not isinstance(e, urllib3.exceptions.NewConnectionError)
        ),
        None,
    )
    if connect is not None or first(socket.timeout, TimeoutError):
        return "no connection in time (connect timeout)"
    dropped = (
        http.client.RemoteDisconnected,
        http.client.IncompleteRead,
        ConnectionResetError,
        BrokenPipeError,
        ConnectionAbortedError,
        urllib3.exceptions.ProtocolError,
        requests.exceptions.ChunkedEncodingError,
    )
    if first(*dropped):
        return "the connection was dropped"
    if first(urllib3.exceptions.NewConnectionError):
        return "cannot connect"
    os_err = next((e for e in chain if isinstance(e, OSError) and e.strerror), None)
    if os_err is not None:
        return str(os_err.strerror)
    return type(err).__name__


def _error_detail(response: requests.Response) -> str:
    """What a registry said about a failure, in a few words: the distribution API's error code
    and message when the body is its JSON, else the HTTP reason phrase; never the raw body."""
    detail = ""
    try:
        errors = json.loads(response.content[:65536]).get("errors") or []
        if errors and isinstance(errors[0], dict):
            detail = str(errors[0].get("message") or errors[0].get("code") or "")
    except (ValueError, AttributeError, requests.RequestException):
        pass
    detail = " ".join((detail or response.reason or "").split())
    return detail[:120]


@dataclass
class _Budget:
    """How long a pull may go on retrying: no retry starts, and no wait is slept, past deadline
    (monotonic). Shared by every request of one pull and by each copy urllib3 makes of its Retry."""

    seconds: float
    deadline: float
    expired: bool = False  # the deadline, not the count, ended the retries

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, wait: float) -> bool:
        if time.monotonic() + wait < self.deadline:
            return True
        self.expired = True
        return False


class _Retry(Retry):
    """urllib3's Retry (counts, backoff with jitter, Retry-After), also ended by the budget."""

    budget: _Budget | None = None

    def new(self, **kw: Any) -> Self:
        fresh = super().new(**kw)
        fresh.budget = self.budget
        return fresh

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        fresh = super().increment(method, url, response, error, _pool, _stacktrace)
        if self.budget is not None:
            wait = None
            if response is not None and self.respect_retry_after_header:
                wait = fresh.get_retry_after(response)
            if wait is None:
                wait = fresh.get_backoff_time()
            if not self.budget.allows(wait):
                reason = error or urllib3.exceptions.ResponseError(
                    f"HTTP {response.status if response else '?'}"
                )
                raise urllib3.exceptions.MaxRetryError(
                    cast(ConnectionPool, _pool), url or "", reason
                )
        return fresh


_TOKENS: dict[tuple[str, str, str], tuple[str, float]] = {}  # (host, scope, login) -> token, expiry
_TOKENS_MAX = 512
LOGIN_HINT = (
    "give the task an auth block, or the node a credential helper or auth file (auth.json, "
    "Docker's config.json); `pyhpc image import` takes --creds and --authfile"
)
# Where Docker Hub's API really is, for references that name docker.io.
API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}


def _login_key(creds: Credentials | None) -> str:
    if creds is None:
        return ""
    return hashlib.sha256(f"{creds.username}\0{creds.password}".encode()).hexdigest()


class Registry:
    def __init__(
        self,
        host: str,
        credentials: Credentials | Keychain | None = None,
        insecure: bool | None = None,
        ca_file: str | None = None,
        timeout: float = 60.0,
        retries: int = 8,
        backoff: float = 0.5,
        pull_timeout: float = DEFAULT_PULL_TIMEOUT,
    ) -> None:
        self.host = host
        # Plain HTTP only for loopback registries (with no CA given) unless asked: like Docker.
        local = host.split(":")[0] in ("localhost", "127.0.0.1", "[::1]") and not ca_file
        scheme = "http" if (local if insecure is None else insecure) else "https"
        self.base = f"{scheme}://{API_HOSTS.get(host, host)}"
        if isinstance(credentials, Credentials):
            credentials = Keychain(login=credentials)
        self.keychain = credentials if credentials is not None else Keychain()
        # Whether this registry asked for a login and accepted one: an image pulled so is
        # private, and the store asks the registry again before it hands it to someone else.
        self.logged_in = False
        self.logins: dict[str, bool] = {}  # scope -> whether its token or header has a login
        self.session = requests.Session()
        # Passed on every request: a session-wide setting loses to REQUESTS_CA_BUNDLE.
        self.verify: str | bool = ca_file or True
        self.timeout = timeout  # one attempt: to connect, and between two reads
        self.retries = retries  # attempts after the first, per request (and resumes, per blob)
        self.backoff = backoff  # seconds: 2x, 4x, 8x... this between attempts, plus jitter
        self.tokens: dict[str, str] = {}
        self.budget = _Budget(0.0, 0.0)
        self.begin(pull_timeout)

    def begin(self, pull_timeout: float | None = None) -> None:
        """Start a pull: from now, retries go on for at most pull_timeout seconds (default: the
        one this client was made with)."""
        seconds = self.budget.seconds if pull_timeout is None else pull_timeout
        self.budget = _Budget(seconds, time.monotonic() + seconds)
        retry = _Retry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            other=0,
            redirect=5,
            status_forcelist=RETRY_STATUS,
            allowed_methods=frozenset({"GET", "HEAD", "PUT"}),  # idempotent ones only
            backoff_factor=self.backoff,
            backoff_jitter=self.backoff,
            backoff_max=30.0,
            raise_on_status=False,  # the last answer is returned, and reported as such
            raise_on_redirect=False,
            respect_retry_after_header=True,
        )
        retry.budget = self.budget
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _attempt_timeout(self) -> float:
        return max(0.5, min(self.timeout, self.budget.seconds or self.timeout))

    def _gave_up(self, started: float, attempts: int = 0) -> str:
        took = time.monotonic() - started
        tries = f"{attempts} attempts in " if attempts > 1 else ""
        if self.budget.expired:
            return f"; gave up after {tries}{took:.1f}s (pull timeout {self.budget.seconds:g}s)"
        return f"; gave up after {tries}{took:.1f}s" if attempts > 1 else ""

    # ---- transport ---------------------------------------------------------------------------

    def _send(self, method: str, url: str, headers: dict[str, str], kw: dict[str, Any]) -> Any:
        """One request with urllib3's retries; a body that breaks off while requests reads it
        (which Retry does not see) is asked for again, within the same budget."""
        for attempt in range(self.retries + 1):
            try:
                return self.session.request(
                    method, url, headers=headers, timeout=self._attempt_timeout(), **kw
                )
            except requests.exceptions.ChunkedEncodingError:
                wait = self.backoff * 2**attempt * (1 + random.random())
                if attempt == self.retries or not self.budget.allows(wait):
                    raise
                time.sleep(wait)
                if hasattr(kw.get("data"), "seek"):
                    kw["data"].seek(0)
        raise AssertionError("unreachable")

    def _request(
        self, method: str, url: str, scope: str, what: str, check: bool = True, **kw: Any
    ) -> requests.Response:
        """The answer to one request, retried as the budget allows; with check, an error
        status raises RegistryError naming what failed."""
        headers = dict(kw.pop("headers", {}))
        kw["verify"] = self.verify
        if scope in self.tokens:
            headers["Authorization"] = self.tokens[scope]
        started = time.monotonic()
        try:
            response = self._send(method, url, headers, kw)
            if response.status_code == 401 and "Authorization" not in headers:
                self.tokens[scope] = self._authorize(response, scope)
                headers["Authorization"] = self.tokens[scope]
                if hasattr(kw.get("data"), "seek"):
                    kw["data"].seek(0)
                response = self._send(method, url, headers, kw)
        except requests.RequestException as err:
            raise RegistryError(
                f"registry {self.host}: {what}: {describe(err)}{self._gave_up(started)}"
            ) from err
        if response.status_code == 401:
            if not self.logins.get(scope):
                raise RegistryError(f"registry {self.host}: {what} needs a login: {LOGIN_HINT}")
            raise RegistryError(f"registry {self.host}: authentication failed for {scope}")
        if check and response.status_code >= 400:
            history = getattr(getattr(response.raw, "retries", None), "history", ()) or ()
            detail = _error_detail(response)
            raise RegistryError(
                f"registry {self.host}: {what}: HTTP {response.status_code}"
                + (f" ({detail})" if detail else "")
                + self._gave_up(started, len(history) + 1)
            )
        return cast(requests.Response, response)

    def _login(self, scope: str) -> Credentials | None:
        """The keychain's login for the repository of scope ("repository:team/app:pull")."""
        repository = scope.split(":")[1] if scope.count(":") >= 2 else ""
        try:
            return self.keychain.lookup(self.host, repository)
        except CredentialError as err:
            raise RegistryError(f"registry {self.host}: {err}") from err

    def _authorize(self, response: requests.Response, scope: str) -> str:
        """The Authorization header answering a 401's challenge; with the keychain's
        soft_fail, a login the registry refuses is dropped and the pull goes on without one."""
        creds = self._login(scope)
        try:
            header = self._answer(response, scope, creds)
        except RegistryError:
            if creds is None or not self.keychain.soft_fail:
                raise
            self.logins[scope] = False
            return self._answer(response, scope, None)
        self.logins[scope] = creds is not None
        self.logged_in = self.logged_in or creds is not None
        return header

    def _answer(self, response: requests.Response, scope: str, creds: Credentials | None) -> str:
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if creds is None:
                raise RegistryError(f"registry {self.host} needs a login: {LOGIN_HINT}")
            if self.keychain.soft_fail and not self._basic_works(creds):
                raise RegistryError(f"registry {self.host}: authentication failed for {scope}")
            raw = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            return f"Basic {raw}"
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"registry {self.host}: unsupported authentication {scheme!r}")
        key = (self.host, scope, _login_key(creds))
        cached = _TOKENS.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        query = {"service": params.get("service", ""), "scope": scope}
        auth = (creds.username, creds.password) if creds else None
        try:
            token = self.session.get(
                params["realm"],
                params=query,
                auth=auth,
                timeout=self._attempt_timeout(),
                verify=self.verify,
            )
        except requests.RequestException as err:
            raise RegistryError(f"registry {self.host}: token service: {describe(err)}") from err
        if token.status_code != 200:
            why = "the login was refused" if token.status_code == 401 else "it refused"
            raise RegistryError(
                f"registry {self.host}: token service: {why} for {scope} (HTTP {token.status_code})"
            )
        try:
            body = token.json()
            value = str(body.get("token") or body.get("access_token") or "")
            lifetime = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError) as err:
            raise RegistryError(f"registry {self.host}: token service sent no JSON") from err
        if not value:
            raise RegistryError(f"registry {self.host}: token service sent no token")
        if len(_TOKENS) >= _TOKENS_MAX:
            _TOKENS.pop(next(iter(_TOKENS)))
        # Used until shortly before it expires (a pull outlasting it asks again on its 401).
        _TOKENS[key] = (f"Bearer {value}", time.monotonic() + max(0.0, lifetime - 10))
        return _TOKENS[key][0]

    def _basic_works(self, creds: Credentials) -> bool:
        """Whether the registry takes a basic login (asked only to decide a soft failure)."""
        try:
            answer = self.session.get(
                f"{self.base}/v2/",
                auth=(creds.username, creds.password),
                timeout=self._attempt_timeout(),
                verify=self.verify,
            )
        except requests.RequestException:
            return True  # not a refusal: let the real request report what happened
        return answer.status_code != 401

    def can_read(self, repository: str, reference: str) -> None:
        """Raise RegistryError unless this client's login may read repository:reference
        (a HEAD of the manifest: nothing is downloaded)."""
        self._request(
            "HEAD",
            f"{self.base}/v2/{repository}/manifests/{reference}",
            f"repository:{repository}:pull",
            f"manifest {repository}:{reference}",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )

    # ---- pulling -----------------------------------------------------------------------------

    def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index; a digest reference is verified."""
        url = f"{self.base}/v2/{repository}/manifests/{reference}"
        what = f"manifest {repository}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        response = self._request(
            "GET",
            url,
            f"repository:{repository}:pull",
            what,
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        body = response.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(
                f"registry {self.host}: manifest {repository}@{reference} has digest {digest}"
            )
        media = response.headers.get("Content-Type", "").split(";")[0]
        try:
            return body, media or json.loads(body).get("mediaType", ""), digest
        except (ValueError, AttributeError) as err:
            raise RegistryError(f"registry {self.host}: {what} is not JSON") from err

    def _blob_response(self, repository: str, digest: str, offset: int) -> requests.Response:
        what = f"blob {digest[:19]}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self._request(
            "GET",
            f"{self.base}/v2/{repository}/blobs/{digest}",
            f"repository:{repository}:pull",
            what,
            stream=True,
            headers=headers,
        )
        response.raw.decode_content = False
        return response

    def open_blob(self, repository: str, digest: str) -> IO[bytes]:
        """A blob as a stream, unverified: the reader checks the digest (see merge). A
        connection that drops mid-way is resumed where it stopped."""
        return cast(IO[bytes], BlobStream(self, repository, digest))

    def blob(
        self, repository: str, digest: str, dest: str, progress: Progress | None = None
    ) -> int:
        """Download a blob into dest, verifying its digest; returns its size. Nothing is left
        at dest when it fails."""
        sha, size = hashlib.sha256(), 0
        try:
            with BlobStream(self, repository, digest) as stream, open(dest, "wb") as out:
                while chunk := stream.read(CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    size += len(chunk)
                    if progress:
                        progress(len(chunk))
        except BaseException:
            if os.path.exists(dest):
                os.unlink(dest)
            raise
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            os.unlink(dest)
            raise RegistryError(
                f"registry {self.host}: blob {digest} arrived as {got} ({size} bytes): "
                "truncated or corrupted download"
            )
        return size

    def blob_bytes(self, repository: str, digest: str, limit: int = 16 << 20) -> bytes:
        """A small blob (a config, a signature payload) in memory, its digest verified;
        RegistryError past limit bytes."""
        data = b""
        with BlobStream(self, repository, digest) as stream:
            while len(data) <= limit and (chunk := stream.read(min(CHUNK, limit + 1 - len(data)))):
                data += chunk
        if len(data) > limit:
            raise RegistryError(f"registry {self.host}: blob {digest} is over {limit} bytes")
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise RegistryError(
                f"registry {self.host}: blob {digest} arrived as {got} ({len(data)} bytes): "
                "truncated or corrupted download"
            )
        return data

    # ---- pushing -----------------------------------------------------------------------------

    def has_blob(self, repository: str, digest: str) -> bool:
        url = f"{self.base}/v2/{repository}/blobs/{digest}"
        scope = f"repository:{repository}:pull,push"
        response = self._request("HEAD", url, scope, f"blob {digest[:19]}", check=False)
        return response.status_code == 200

    def push_blob(self, repository: str, path: str, digest: str) -> None:
        if self.has_blob(repository, digest):
            return
        scope = f"repository:{repository}:pull,push"
        start = self._request(
            "POST", f"{self.base}/v2/{repository}/blobs/uploads/", scope, "starting an upload"
        )
        location = start.headers["Location"]
        if location.startswith("/"):
            location = self.base + location
        separator = "&" if "?" in location else "?"
        with open(path, "rb") as data:
            self._request(
                "PUT",
                f"{location}{separator}digest={digest}",
                scope,
                f"uploading {digest[:19]}",
                data=data,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(os.path.getsize(path)),
                },
            )

    def push_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        what = f"pushing manifest {repository}:{reference}"
        self._request(
            "PUT",
            f"{self.base}/v2/{repository}/manifests/{reference}",
            f"repository:{repository}:pull,push",
            what,
            data=body,
            headers={"Content-Type": media_type},
        )
        return "sha256:" + hashlib.sha256(body).hexdigest()


# What a dropped connection raises while a body is read (urllib3 2 enforces Content-Length).
_READ_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class BlobStream(io.RawIOBase):
    """A blob's bytes from the registry, read once from the start. A connection that drops
    mid-way is picked up where it stopped with an HTTP Range request; a registry that ignores
    ranges (200, not 206) sends the blob again and what was read already is skipped. At most
    the registry's `retries` resumes in a row without progress, within its pull budget."""

    def __init__(self, registry: Registry, repository: str, digest: str) -> None:
        super().__init__()
        self.registry, self.repository, self.digest = registry, repository, digest
        self.offset = 0  # bytes handed to the reader
        self.failures = 0  # resumes in a row that brought nothing
        self.started = time.monotonic()
        self.window, self.window_bytes = self.started, 0  # the speed floor's current window
        self.response = registry._blob_response(repository, digest, 0)
        self.length = int(self.response.headers.get("Content-Length") or 0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                # read1: what has arrived, so a trickling registry meets the speed floor
                data = self.response.raw.read1(len(view))
            except _READ_ERRORS as err:
                self._resume(err)
                continue
            if not data and self.length and self.offset < self.length:
                self._resume(EOFError("the connection closed early"))
                continue
            view[: len(data)] = data
            self.offset += len(data)
            if data:
                self.failures = 0
            self._keeps_pace(len(data))
            return len(data)

    def _keeps_pace(self, got: int) -> None:
        now = time.monotonic()
        self.window_bytes += got
        if now - self.window < SLOW_WINDOW:
            return
        if self.window_bytes < SLOW_BYTES * (now - self.window) / SLOW_WINDOW:
            raise RegistryError(
                f"registry {self.registry.host}: blob {self.digest[:19]}: "
                f"{self.window_bytes} bytes in the last {now - self.window:.0f}s, under "
                f"{SLOW_BYTES // SLOW_WINDOW // 1024:.0f} KiB/s (after {self.offset} of "
                f"{self.length or '?'} bytes): too slow, given up"
            )
        self.window, self.window_bytes = now, 0

    def close(self) -> None:
        if not self.closed:
            self.response.close()
        super().close()

    def _resume(self, err: BaseException) -> None:
        registry = self.registry
        self.response.close()
        self.failures += 1
        wait = registry.backoff * 2 ** (self.failures - 1) * (1 + random.random())
        if self.failures > registry.retries or not registry.budget.allows(wait):
            where = f" after {self.offset} of {self.length or '?'} bytes" if self.offset else ""
            raise RegistryError(
                f"registry {registry.host}: blob {self.digest[:19]}: {describe(err)}{where}"
                + registry._gave_up(self.started, self.failures)
            ) from err
        time.sleep(wait)
        response = registry._blob_response(self.repository, self.digest, self.offset)
        if response.status_code == 206:
            first = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not first or int(first.group(1)) != self.offset:
                response.close()
                raise RegistryError(
                    f"registry {registry.host}: blob {self.digest[:19]}: asked to resume at byte "
                    f"{self.offset}, got {response.headers.get('Content-Range')!r}"
                )
            self.response = response
            return
        self.response = response  # the whole blob again: skip what the reader has
        skip = self.offset
        while skip:
            try:
                got = len(response.raw.read(min(skip, CHUNK)))
            except _READ_ERRORS as again:
                self._resume(again)
                return
            if not got:
                self._resume(EOFError("the connection closed early"))
                return
            skip -= got


def is_digest(value: object) -> bool:
    """value is a digest pyhpc checks: sha256:<64 lowercase hex>."""
    return isinstance(value, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", value) is not None


def select_platform(index: dict[str, Any], where: str) -> str:
    """The digest of the index entry for this node's platform (linux and its architecture).
    Only a digest: fetched by anything else (a tag), the entry would bind nothing."""
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}.get(
        machine, machine
    )
    seen = []
    for entry in index.get("manifests", []):
        platform = entry.get("platform", {})
        seen.append(f"{platform.get('os')}/{platform.get('architecture')}")
        if platform.get("os") == "linux" and platform.get("architecture") == arch:
            if not is_digest(entry.get("digest")):
                raise RegistryError(
                    f"{where}: the index entry for linux/{arch} has digest "
                    f"{entry.get('digest')!r}, not sha256:<64 hex>"
                )
            return str(entry["digest"])
    raise RegistryError(f"{where}: no linux/{arch} image in the index (it has {', '.join(seen)})")
