"""A small client of the OCI distribution API (v2): manifests and blobs, pulled and pushed,
with bearer-token and basic authentication. The one seam through which pyhpc reaches a registry.

Credentials come from, in order: the arguments, PYHPC_REGISTRY_USER/PYHPC_REGISTRY_PASSWORD,
and the Docker config file ($DOCKER_CONFIG/config.json or ~/.docker/config.json).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import requests

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[0], MANIFEST_TYPES[2]
CHUNK = 1 << 20
Progress = Callable[[int], None]


class RegistryError(RuntimeError):
    """The registry refused, or answered something we cannot use; the message says what."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def credentials_for(host: str) -> Credentials | None:
    user, password = (
        os.environ.get("PYHPC_REGISTRY_USER"),
        os.environ.get("PYHPC_REGISTRY_PASSWORD"),
    )
    if user and password is not None:
        return Credentials(user, password)
    config_dir = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
    try:
        with open(os.path.join(config_dir, "config.json"), encoding="utf-8") as f:
            auths = json.load(f).get("auths", {})
    except (OSError, ValueError):
        return None
    for key in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(key)
        if isinstance(entry, dict) and entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return Credentials(user, password)
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class Registry:
    def __init__(
        self,
        host: str,
        credentials: Credentials | None = None,
        insecure: bool | None = None,
        ca_file: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.host = host
        # Plain HTTP only for loopback registries (with no CA given) unless asked: like Docker.
        local = host.split(":")[0] in ("localhost", "127.0.0.1", "[::1]") and not ca_file
        self.base = f"{'http' if (local if insecure is None else insecure) else 'https'}://{host}"
        self.credentials = credentials if credentials is not None else credentials_for(host)
        self.session = requests.Session()
        # Passed on every request: a session-wide setting loses to REQUESTS_CA_BUNDLE.
        self.verify: str | bool = ca_file or True
        self.timeout = timeout
        self.tokens: dict[str, str] = {}

    # ---- transport ---------------------------------------------------------------------------

    def _request(self, method: str, url: str, scope: str, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        kw["verify"] = self.verify
        if scope in self.tokens:
            headers["Authorization"] = self.tokens[scope]
        try:
            response = self.session.request(
                method, url, headers=headers, timeout=self.timeout, **kw
            )
            if response.status_code == 401 and "Authorization" not in headers:
                self.tokens[scope] = self._authorize(response, scope)
                headers["Authorization"] = self.tokens[scope]
                if hasattr(kw.get("data"), "seek"):
                    kw["data"].seek(0)
                response = self.session.request(
                    method, url, headers=headers, timeout=self.timeout, **kw
                )
        except requests.RequestException as err:
            raise RegistryError(f"registry {self.host}: {err}") from err
        if response.status_code == 401:
            raise RegistryError(f"registry {self.host}: authentication failed for {scope}")
        return response

    def _authorize(self, response: requests.Response, scope: str) -> str:
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        creds = self.credentials
        if scheme == "basic":
            if creds is None:
                raise RegistryError(
                    f"registry {self.host} needs a login: set PYHPC_REGISTRY_USER and "
                    "PYHPC_REGISTRY_PASSWORD, or log in with a Docker-compatible client"
                )
            raw = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            return f"Basic {raw}"
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"registry {self.host}: unsupported authentication {scheme!r}")
        query = {"service": params.get("service", ""), "scope": scope}
        auth = (creds.username, creds.password) if creds else None
        try:
            token = self.session.get(
                params["realm"], params=query, auth=auth, timeout=self.timeout, verify=self.verify
            )
        except requests.RequestException as err:
            raise RegistryError(f"registry {self.host}: token service: {err}") from err
        if token.status_code != 200:
            raise RegistryError(
                f"registry {self.host}: token service refused {scope} (HTTP {token.status_code})"
            )
        body = token.json()
        return f"Bearer {body.get('token') or body.get('access_token')}"

    def _check(self, response: requests.Response, what: str) -> requests.Response:
        if response.status_code >= 400:
            detail = response.text[:300].strip()
            raise RegistryError(
                f"registry {self.host}: {what}: HTTP {response.status_code} {detail}"
            )
        return response

    # ---- pulling -----------------------------------------------------------------------------

    def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index; a digest reference is verified."""
        url = f"{self.base}/v2/{repository}/manifests/{reference}"
        response = self._check(
            self._request(
                "GET",
                url,
                f"repository:{repository}:pull",
                headers={"Accept": ", ".join(MANIFEST_TYPES)},
            ),
            f"manifest {repository}:{reference}",
        )
        body = response.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(
                f"registry {self.host}: manifest {repository}@{reference} has digest {digest}"
            )
        media = response.headers.get("Content-Type", "").split(";")[0]
        return body, media or json.loads(body).get("mediaType", ""), digest

    def open_blob(self, repository: str, digest: str) -> IO[bytes]:
        """A blob as a stream, unverified: the reader checks the digest (see merge)."""
        url = f"{self.base}/v2/{repository}/blobs/{digest}"
        response = self._check(
            self._request("GET", url, f"repository:{repository}:pull", stream=True),
            f"blob {digest[:19]}",
        )
        response.raw.decode_content = False
        return response.raw  # type: ignore[return-value]

    def blob(
        self, repository: str, digest: str, dest: str, progress: Progress | None = None
    ) -> int:
        """Download a blob into dest, verifying its digest; returns its size."""
        url = f"{self.base}/v2/{repository}/blobs/{digest}"
        response = self._check(
            self._request("GET", url, f"repository:{repository}:pull", stream=True),
            f"blob {digest[:19]}",
        )
        sha, size = hashlib.sha256(), 0
        try:
            with open(dest, "wb") as out:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    size += len(chunk)
                    if progress:
                        progress(len(chunk))
        except requests.RequestException as err:
            raise RegistryError(f"registry {self.host}: blob {digest[:19]}: {err}") from err
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            os.unlink(dest)
            raise RegistryError(
                f"registry {self.host}: blob {digest} arrived as {got} ({size} bytes): "
                "truncated or corrupted download"
            )
        return size

    # ---- pushing -----------------------------------------------------------------------------

    def has_blob(self, repository: str, digest: str) -> bool:
        url = f"{self.base}/v2/{repository}/blobs/{digest}"
        return self._request("HEAD", url, f"repository:{repository}:pull,push").status_code == 200

    def push_blob(self, repository: str, path: str, digest: str) -> None:
        if self.has_blob(repository, digest):
            return
        scope = f"repository:{repository}:pull,push"
        start = self._check(
            self._request("POST", f"{self.base}/v2/{repository}/blobs/uploads/", scope),
            "starting an upload",
        )
        location = start.headers["Location"]
        if location.startswith("/"):
            location = self.base + location
        separator = "&" if "?" in location else "?"
        with open(path, "rb") as data:
            self._check(
                self._request(
                    "PUT",
                    f"{location}{separator}digest={digest}",
                    scope,
                    data=data,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(os.path.getsize(path)),
                    },
                ),
                f"uploading {digest[:19]}",
            )

    def push_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        self._check(
            self._request(
                "PUT",
                f"{self.base}/v2/{repository}/manifests/{reference}",
                f"repository:{repository}:pull,push",
                data=body,
                headers={"Content-Type": media_type},
            ),
            f"pushing manifest {repository}:{reference}",
        )
        return "sha256:" + hashlib.sha256(body).hexdigest()


def select_platform(index: dict[str, Any], where: str) -> str:
    """The digest of the index entry for this node's platform (linux and its architecture)."""
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}.get(
        machine, machine
    )
    seen = []
    for entry in index.get("manifests", []):
        platform = entry.get("platform", {})
        seen.append(f"{platform.get('os')}/{platform.get('architecture')}")
        if platform.get("os") == "linux" and platform.get("architecture") == arch:
            return str(entry["digest"])
    raise RegistryError(f"{where}: no linux/{arch} image in the index (it has {', '.join(seen)})")
