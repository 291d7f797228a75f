"""Registry logins: where they come from (auth files, credential helpers, the caller), pulls
through real registries that demand them (htpasswd and a token server), and the store never
handing a private image to a login its registry would refuse."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_driver.driver.config import TaskConfig
from nomad_driver.images import credentials
from nomad_driver.images.credentials import CredentialError, Credentials, Keychain
from nomad_driver.images.registry import Registry
from nomad_driver.images.store import Store, StoreError
from nomad_driver.wire import schema
from tests.images.ocitools import layer_tar, write_layout
from tests.images.test_merge import BASE
from tests.registry import RunningRegistry, run_registry

USER, PASSWORD = "tester", "s3cret-pw"


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on PATH for fake docker-credential-* programs; returns its log file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def write_helper(bin_dir: Path, name: str, logins: dict[str, tuple[str, str]]) -> Path:
    """docker-credential-NAME: answers `get` from logins, logs each server it is asked for."""
    log = bin_dir / f"{name}.log"
    table = json.dumps({k: {"Username": u, "Secret": p} for k, (u, p) in logins.items()})
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(
        "#!/usr/bin/python3\n"
        "import json, sys\n"
        "assert sys.argv[1:] == ['get'], sys.argv\n"
        "server = sys.stdin.read().strip()\n"
        f"open({str(log)!r}, 'a').write(server + '\\n')\n"
        f"table = json.loads({table!r})\n"
        "if server not in table:\n"
        "    print('credentials not found in native keychain'); sys.exit(1)\n"
        "print(json.dumps({'ServerURL': server, **table[server]}))\n"
    )
    script.chmod(0o755)
    return log


# ---- where logins come from ------------------------------------------------------------------


def test_auth_file_takes_the_most_specific_entry(tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps(
            {
                "auths": {
                    "reg.example:5000": {"auth": basic("host-wide", "pw1")},
                    "reg.example:5000/team": {"auth": basic("team", "pw2")},
                    "reg.example:5000/team/app": {"auth": basic("app", "pw3")},
                }
            }
        )
    )
    chain = Keychain(files=(str(auth),), environment=False)
    assert chain.lookup("reg.example:5000", "team/app") == Credentials("app", "pw3", "")
    found = chain.lookup("reg.example:5000", "team/other")
    assert (found.username, found.password) == ("team", "pw2")  # type: ignore[union-attr]
    found = chain.lookup("reg.example:5000", "else/app")
    assert (found.username, found.password) == ("host-wide", "pw1")  # type: ignore[union-attr]
    assert chain.lookup("other.example", "team/app") is None


def test_docker_config_helpers_per_registry_then_the_store(tmp_path: Path, helpers: Path) -> None:
    per_host = write_helper(helpers, "perhost", {"a.example": ("alice", "apw")})
    default = write_helper(
        helpers, "default", {"b.example": ("bob", "bpw"), credentials.DOCKER_HUB_SERVER: ("d", "h")}
    )
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {"c.example": {"auth": basic("carol", "cpw")}},
                "credHelpers": {"a.example": "perhost"},
                "credsStore": "default",
            }
        )
    )
    chain = Keychain(files=(str(config),), environment=False)
    found = chain.lookup("a.example", "x/y")
    assert found is not None and (found.username, found.password) == ("alice", "apw")
    assert "credential helper perhost" in found.source
    found = chain.lookup("b.example")
    assert found is not None and (found.username, found.password) == ("bob", "bpw")
    found = chain.lookup("c.example")  # an inline login comes before the store
    assert found is not None and found.username == "carol"
    found = chain.lookup("docker.io", "library/busybox")  # Docker Hub's key, as Docker asks
    assert found is not None and found.username == "d"
    assert chain.lookup("nobody.example") is None  # "credentials not found": no login, no error
    assert per_host.read_text().split() == ["a.example"]
    assert default.read_text().split() == [
        "b.example",
        credentials.DOCKER_HUB_SERVER,
        "nobody.example",
    ]


def test_default_files_follow_podman_then_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    for var in ("REGISTRY_AUTH_FILE", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert credentials.default_files() == (
        "/run/user/1000/containers/auth.json",
        "/home/u/.config/containers/auth.json",
        "/home/u/.docker/config.json",
    )
    monkeypatch.setenv("REGISTRY_AUTH_FILE", "/etc/auth.json")
    monkeypatch.setenv("DOCKER_CONFIG", "/etc/docker")
    assert credentials.default_files() == ("/etc/auth.json", "/etc/docker/config.json")


def test_a_broken_helper_fails_in_one_line_unless_soft_fail(helpers: Path) -> None:
    broken = helpers / "docker-credential-broken"
    broken.write_text("#!/bin/sh\necho 'error: the vault is sealed' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(CredentialError) as err:
        Keychain(helper="broken", files=(), environment=False).lookup("a.example")
    assert str(err.value) == (
        "credential helper docker-credential-broken failed for a.example "
        "(exit 3: error: the vault is sealed)"
    )
    assert (
        Keychain(helper="broken", files=(), environment=False, soft_fail=True).lookup("a.example")
        is None
    )
    with pytest.raises(CredentialError, match="docker-credential-absent is not on PATH"):
        Keychain(helper="absent", files=(), environment=False).lookup("a.example")
    with pytest.raises(CredentialError, match="must be a plain name"):
        Keychain(helper="../../bin/sh", files=(), environment=False).lookup("a.example")


def test_malformed_auth_entries_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text(json.dumps({"auths": {"a.example": {"auth": "%%%"}}}))
    with pytest.raises(CredentialError, match=r"auth.json \(a.example\): 'auth' is not base64"):
        Keychain(files=(str(bad),), environment=False).lookup("a.example")
    bad.write_text("{not json")
    with pytest.raises(CredentialError, match="cannot read registry logins from"):
        Keychain(files=(str(bad),), environment=False).lookup("a.example")


def test_passwords_stay_out_of_reprs_and_messages() -> None:
    login = Credentials("me", "hunter2-secret", "test")
    assert "hunter2" not in repr(login) and "hunter2" not in str(login)
    cfg = schema.load(
        TaskConfig,
        {"image": "/x.sqsh", "auth": {"username": "me", "password": "hunter2-secret"}},
        "task",
    )
    assert "hunter2" not in repr(cfg) and cfg.auth is not None
    assert cfg.auth.password == "hunter2-secret"


# ---- through real registries -------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_layout(tmp_path_factory.mktemp("layout") / "img", [layer_tar(BASE)], tag="1")


def push(reg: RunningRegistry, layout: Path, repository: str) -> str:
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-creds", f"{USER}:{PASSWORD}"]
        + ["--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{reg.host}/{repository}"],
        check=True,
        capture_output=True,
    )
    return f"docker://{reg.host}/{repository}"


@pytest.fixture(scope="module", params=["htpasswd", "token"])
def private(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, layout: Path
) -> Iterator[tuple[RunningRegistry, str, str]]:
    """A registry that needs a login, with team/app:1 and public/app:1 pushed."""
    token = request.param == "token"
    work = tmp_path_factory.mktemp(request.param)
    with run_registry(work / "registry", auth=not token, token=token) as reg:
        yield reg, push(reg, layout, "team/app:1"), push(reg, layout, "public/app:1")


def test_each_login_source_pulls_and_none_is_refused(
    private: tuple[RunningRegistry, str, str], tmp_path: Path, helpers: Path
) -> None:
    reg, ref, _ = private
    write_helper(helpers, "pyhpctest", {reg.host: (USER, PASSWORD)})
    auth_json = tmp_path / "auth.json"
    auth_json.write_text(
        json.dumps({"auths": {f"{reg.host}/team": {"auth": basic(USER, PASSWORD)}}})
    )
    docker = tmp_path / "config.json"
    docker.write_text(json.dumps({"credsStore": "pyhpctest"}))
    sources = {
        "login": Keychain(login=Credentials(USER, PASSWORD), files=(), environment=False),
        "helper": Keychain(helper="pyhpctest", files=(), environment=False),
        "auth.json": Keychain(files=(str(auth_json),), environment=False),
        "credsStore": Keychain(files=(str(docker),), environment=False),
    }
    digests = set()
    for name, chain in sources.items():
        image = Store(str(tmp_path / f"store-{name}")).ensure(
            ref, registry=Registry(reg.host, chain)
        )
        digests.add(image.digest)
    assert len(digests) == 1
    with pytest.raises(StoreError, match=f"registry {reg.host}.* needs a login: give the task"):
        Store(str(tmp_path / "anonymous")).ensure(
            ref, registry=Registry(reg.host, credentials.ANONYMOUS)
        )
    wrong = Keychain(login=Credentials(USER, "wrong"), files=(), environment=False)
    with pytest.raises(StoreError, match="authentication failed|the login was refused"):
        Store(str(tmp_path / "wrong")).ensure(ref, registry=Registry(reg.host, wrong))


def test_store_hands_a_private_image_only_to_a_login_that_may_read_it(
    private: tuple[RunningRegistry, str, str], tmp_path: Path
) -> None:
    """The attack: tenant A pulls a private image with its login; tenant B, with none, names
    the same reference on the same node. The control: a login that may read it gets it."""
    reg, ref, public = private
    store = Store(str(tmp_path / "store"))
    login = Keychain(login=Credentials(USER, PASSWORD), files=(), environment=False)
    first = store.ensure(ref, registry=Registry(reg.host, login))
    assert store.private(ref)
    with pytest.raises(StoreError, match=f"{ref} is private, and its registry does not let"):
        store.ensure(ref, registry=Registry(reg.host, credentials.ANONYMOUS))
    wrong = Keychain(login=Credentials(USER, "wrong"), files=(), environment=False)
    with pytest.raises(StoreError, match="is private"):
        store.ensure(ref, registry=Registry(reg.host, wrong))
    assert store.ensure(ref, registry=Registry(reg.host, login)).digest == first.digest
    if reg.tokens is not None:  # public/ needs no login here: nothing private about it
        anonymous = store.ensure(public, registry=Registry(reg.host, credentials.ANONYMOUS))
        assert anonymous.digest == first.digest and not store.private(public)


def test_soft_fail_pulls_without_the_refused_login(
    private: tuple[RunningRegistry, str, str], tmp_path: Path, helpers: Path
) -> None:
    reg, _, public = private
    if reg.tokens is None:
        pytest.skip("an htpasswd registry lets no one pull without a login")
    broken = helpers / "docker-credential-broken"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    for chain in (
        Keychain(login=Credentials(USER, "wrong"), files=(), environment=False, soft_fail=True),
        Keychain(helper="broken", files=(), environment=False, soft_fail=True),
    ):
        image = Store(str(tmp_path / "s")).pull(public, registry=Registry(reg.host, chain))
        assert image.digest.startswith("sha256:")
    strict = Keychain(login=Credentials(USER, "wrong"), files=(), environment=False)
    with pytest.raises(StoreError, match="token service: the login was refused"):
        Store(str(tmp_path / "t")).pull(public, registry=Registry(reg.host, strict))


def test_tokens_are_asked_once_per_scope_and_login(
    private: tuple[RunningRegistry, str, str], tmp_path: Path
) -> None:
    reg, ref, _ = private
    if reg.tokens is None:
        pytest.skip("htpasswd registries have no tokens")
    # A login of its own, so that no token cached by another test is reused.
    reg.tokens.users["cache-test"] = "pw"
    login = Keychain(login=Credentials("cache-test", "pw"), files=(), environment=False)
    before = len(reg.tokens.asked)
    Store(str(tmp_path / "a")).ensure(ref, registry=Registry(reg.host, login))
    Store(str(tmp_path / "b")).ensure(ref, registry=Registry(reg.host, login))
    asked = reg.tokens.asked[before:]
    assert asked == [("cache-test", "repository:team/app:pull")]


def test_docker_hub_names_map_to_its_registry_and_library() -> None:
    from nomad_driver.images import reference

    ref = reference.parse("docker://docker.io/busybox:1.36")
    assert (ref.registry, ref.repository, str(ref)) == (
        "docker.io", "library/busybox", "docker://docker.io/library/busybox:1.36"
    )  # fmt: skip
    assert reference.parse("docker://docker.io/team/app").repository == "team/app"
    assert Registry("docker.io").base == "https://registry-1.docker.io"
    assert Registry("index.docker.io").base == "https://registry-1.docker.io"
    assert credentials.server_keys("docker.io")[0] == "https://index.docker.io/v1/"
