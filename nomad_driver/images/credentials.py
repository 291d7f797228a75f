"""Registry credentials, found where Docker, Podman and Nomad's docker driver look for them.

A Keychain answers "which login for this registry (and repository)?", asked only when the
registry demands one. In order, the first that has an answer wins:

1. the caller's own login (a task's `auth { username, password }`, `pyhpc image --creds`);
2. the caller's credential helper (a task's `auth { helper }`, a plugin-wide `auth { helper }`);
3. PYHPC_REGISTRY_USER and PYHPC_REGISTRY_PASSWORD (only where the keychain reads the
   environment: the CLI, not the driver);
4. the auth files, each in turn: per entry, the most specific `auths` key
   ("host/team/app", then "host/team", then "host"), `credHelpers[host]`, then `credsStore`.
   The files are containers' auth.json ($REGISTRY_AUTH_FILE, else
   $XDG_RUNTIME_DIR/containers/auth.json and ~/.config/containers/auth.json) and Docker's
   ($DOCKER_CONFIG/config.json, else ~/.docker/config.json), unless the caller names its own.

A credential helper is the `docker-credential-NAME` program found on PATH, run as Docker runs
it (`get`, the server on stdin, JSON on stdout). A password never appears in a message, a
repr or a log line.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from nomad_driver.util.errors import Refused

# Docker keeps Docker Hub's logins under this key, whatever host a reference names.
DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HELPER_TIMEOUT = 30.0
IDENTITY_TOKEN_USER = "<token>"  # what a helper returns as Username for an OAuth refresh token


class CredentialError(Refused, RuntimeError):
    """A credential source failed (a helper that broke, an unreadable auth entry)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = field(default="", compare=False)  # where from, for messages

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, source={self.source!r})"


def default_files() -> tuple[str, ...]:
    """The auth files Podman and Docker read, in the order Podman reads them."""
    home = os.path.expanduser("~")
    if os.environ.get("REGISTRY_AUTH_FILE"):
        containers = [os.environ["REGISTRY_AUTH_FILE"]]
    else:
        containers = []
        if os.environ.get("XDG_RUNTIME_DIR"):
            containers.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers/auth.json"))
        config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        containers.append(os.path.join(config_home, "containers/auth.json"))
    docker = os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker"))
    return (*containers, os.path.join(docker, "config.json"))


def check_helper_name(name: str) -> str | None:
    """Why name cannot be a credential helper's NAME, or None."""
    if not HELPER_NAME.match(name):
        return f"credential helper {name!r} must be a plain name (docker-credential-NAME on PATH)"
    return None


def server_keys(host: str) -> list[str]:
    """The keys an auth file may file host's login under."""
    if host in DOCKER_HUB_KEYS:
        return [DOCKER_HUB_SERVER, *DOCKER_HUB_KEYS]
    return [host, f"https://{host}", f"http://{host}"]


def run_helper(name: str, host: str) -> Credentials | None:
    """What docker-credential-NAME has for host: None when it has no login for it."""
    problem = check_helper_name(name)
    if problem:
        raise CredentialError(problem)
    program = shutil.which(f"docker-credential-{name}")
    if program is None:
        raise CredentialError(f"credential helper docker-credential-{name} is not on PATH")
    server = DOCKER_HUB_SERVER if host in DOCKER_HUB_KEYS else host
    try:
        done = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise CredentialError(
            f"credential helper docker-credential-{name} gave no answer for {host} "
            f"in {HELPER_TIMEOUT:g}s"
        ) from err
    except OSError as err:
        raise CredentialError(f"credential helper docker-credential-{name}: {err}") from err
    said = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0:
        # Docker's helpers say this when they simply have no login for the server.
        if "credentials not found" in said.lower():
            return None
        why = (done.stderr.decode(errors="replace").strip() or said).splitlines()
        raise CredentialError(
            f"credential helper docker-credential-{name} failed for {host} "
            f"(exit {done.returncode}{': ' + why[-1][:200] if why else ''})"
        )
    try:
        answer = json.loads(said)
        user, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError) as err:
        raise CredentialError(
            f"credential helper docker-credential-{name} answered for {host} without "
            "JSON Username and Secret"
        ) from err
    return Credentials(user, secret, f"credential helper {name}")


def _decode_auth(entry: dict[str, object], where: str) -> Credentials | None:
    if entry.get("auth"):
        try:
            raw = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as err:
            raise CredentialError(f"{where}: 'auth' is not base64 of USER:PASSWORD") from err
        user, sep, password = raw.partition(":")
        if not sep:
            raise CredentialError(f"{where}: 'auth' is not base64 of USER:PASSWORD")
        return Credentials(user, password, where)
    if entry.get("identitytoken"):
        return Credentials(IDENTITY_TOKEN_USER, str(entry["identitytoken"]), where)
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(str(entry["username"]), str(entry["password"]), where)
    return None


def from_file(path: str, host: str, repository: str = "") -> Credentials | None:
    """host's login in one Docker config.json or containers auth.json (None: none there)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CredentialError(f"cannot read registry logins from {path}: {err}") from err
    if not isinstance(data, dict):
        raise CredentialError(f"cannot read registry logins from {path}: not a JSON object")
    auths = data.get("auths")
    auths = auths if isinstance(auths, dict) else {}
    # Most specific first: containers' auth.json may hold a login per repository.
    parts = [p for p in repository.split("/") if p]
    scoped = [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    for key in [*scoped, *server_keys(host)]:
        entry = auths.get(key)
        if isinstance(entry, dict):
            found = _decode_auth(entry, f"{path} ({key})")
            if found is not None:
                return found
    helpers = data.get("credHelpers")
    helpers = helpers if isinstance(helpers, dict) else {}
    for key in server_keys(host):
        if isinstance(helpers.get(key), str):
            return run_helper(helpers[key], host)
    if isinstance(data.get("credsStore"), str) and data["credsStore"]:
        return run_helper(data["credsStore"], host)
    return None


@dataclass(frozen=True)
class Keychain:
    """Where a pull's credentials come from (see the module's docstring for the order)."""

    login: Credentials | None = None
    helper: str = ""
    files: Sequence[str] | None = None  # None: default_files()
    environment: bool = True
    soft_fail: bool = False  # a failing source is skipped instead of failing the pull

    def lookup(self, host: str, repository: str = "") -> Credentials | None:
        if self.login is not None:
            return self.login
        try:
            return self._lookup(host, repository)
        except CredentialError:
            if self.soft_fail:
                return None
            raise

    def _lookup(self, host: str, repository: str) -> Credentials | None:
        if self.helper:
            found = run_helper(self.helper, host)
            if found is not None:
                return found
        if self.environment:
            user = os.environ.get("PYHPC_REGISTRY_USER")
            password = os.environ.get("PYHPC_REGISTRY_PASSWORD")
            if user and password is not None:
                return Credentials(user, password, "PYHPC_REGISTRY_USER")
        for path in default_files() if self.files is None else self.files:
            found = from_file(path, host, repository)
            if found is not None:
                return found
        return None


ANONYMOUS = Keychain(files=(), environment=False)
