"""cosign signatures made by the real cosign binary (built from its Go module like the test bed's
Nomad), checked by pyhpc against a real registry: with a PEM key, with a Vault transit key as
cosign's hashivault:// uses it, and refused unsigned, signed by another key, or with a key file
a tenant could replace."""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_driver.images.registry import Registry
from nomad_driver.signing import cosign
from nomad_driver.signing.cosign import CosignError
from nomad_driver.signing.vault import Auth, Vault
from nomad_driver.signing.verify import Verifier
from tests.images.ocitools import layer_tar, skopeo_push, write_layout
from tests.images.test_merge import BASE
from tests.registry import RunningRegistry, run_registry
from tests.vaultbed import TOKEN, dev_vault

PASSWORD = "cosign-test-pw"


def cosign_binary() -> str:
    """The test bed's cosign build; skipped where there is none, failed in CI (CI=true)."""
    found = sorted(glob.glob(os.path.expanduser("~/.cache/pyhpc/testbed/cosign-*/cosign")))
    if not found:
        why = "no cosign build: run scripts/testbed/build.sh cosign"
        if os.environ.get("CI") == "true":
            raise RuntimeError(why)
        pytest.skip(why)
    return found[-1]


def run_cosign(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [cosign_binary(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COSIGN_PASSWORD": PASSWORD, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def sign(
    reg: RunningRegistry, repository: str, digest: str, key: str, cwd: Path, **env: str
) -> None:
    run_cosign(
        "sign", "--key", key, "--tlog-upload=false", "--yes", "--allow-http-registry",
        f"{reg.host}/{repository}@{digest}", cwd=cwd, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRegistry, Path, str]]:
    """A registry with one image under three repositories, and two cosign key pairs."""
    work = tmp_path_factory.mktemp("cosign")
    layout = write_layout(work / "layout", [layer_tar(BASE)], tag="1")
    for name in ("site", "other"):
        (work / name).mkdir()
        run_cosign("generate-key-pair", cwd=work / name)
    with run_registry(work / "registry") as reg:
        for repository in ("signed", "unsigned", "foreign"):
            skopeo_push(layout, "1", f"docker://{reg.host}/{repository}:1")
        _, _, digest = Registry(reg.host).manifest("signed", "1")
        sign(reg, "signed", digest, "cosign.key", work / "site")
        sign(reg, "foreign", digest, "cosign.key", work / "other")
        yield reg, work, digest


def test_a_pem_key_verifies_what_cosign_signed_and_nothing_else(
    setup: tuple[RunningRegistry, Path, str],
) -> None:
    reg, work, digest = setup
    client = Registry(reg.host)
    keys = [("site.pub", cosign.pem_check(str(work / "site" / "cosign.pub")))]
    verified = cosign.verify(client, "signed", (digest,), keys)
    assert verified.manifest_digest == digest and verified.key == "site.pub"
    assert verified.docker_reference == f"{reg.host}/signed"
    with pytest.raises(CosignError, match=f"no cosign signature for {digest[:19]}"):
        cosign.verify(client, "unsigned", (digest,), keys)
    with pytest.raises(CosignError, match="signed, but by none of the trusted keys"):
        cosign.verify(client, "foreign", (digest,), keys)
    other = [("other.pub", cosign.pem_check(str(work / "other" / "cosign.pub")))]
    assert cosign.verify(client, "foreign", (digest,), other).key == "other.pub"  # control


def test_a_key_file_a_tenant_could_replace_is_not_trusted(
    setup: tuple[RunningRegistry, Path, str], tmp_path: Path
) -> None:
    _, work, _ = setup
    writable = tmp_path / "cosign.pub"
    writable.write_bytes((work / "site" / "cosign.pub").read_bytes())
    for change in (lambda: os.chmod(writable, 0o666), lambda: os.chown(writable, 1000, 1000)):
        os.chmod(writable, 0o644)
        os.chown(writable, 0, 0)
        change()
        with pytest.raises(CosignError, match="must be a regular file owned by root"):
            cosign.pem_check(str(writable))
    link = tmp_path / "link.pub"
    link.symlink_to(work / "site" / "cosign.pub")
    with pytest.raises(CosignError, match="cosign key .*link.pub"):
        cosign.pem_check(str(link))


def test_a_vault_transit_key_signs_as_hashivault_and_the_verifier_trusts_it(
    setup: tuple[RunningRegistry, Path, str], tmp_path: Path
) -> None:
    reg, work, digest = setup
    with dev_vault() as (address, _):
        vault = Vault(address=address, auth=Auth(token=TOKEN))
        vault.client().sys.enable_secrets_engine("transit", path="transit")
        env = {"VAULT_ADDR": address, "VAULT_TOKEN": TOKEN}
        run_cosign("generate-key-pair", "--kms", "hashivault://release", cwd=tmp_path, env=env)
        layout = write_layout(tmp_path / "layout", [layer_tar(BASE)], tag="1")
        skopeo_push(layout, "1", f"docker://{reg.host}/vaulted:1")
        sign(reg, "vaulted", digest, "hashivault://release", tmp_path, **env)
        trusting = Verifier(vault, (), str(tmp_path / "c1"), cosign_keys=("hashivault://release",))
        verified = trusting.verify_cosign(Registry(reg.host), "vaulted", (digest,))
        assert verified.key == "hashivault://release"
        with pytest.raises(CosignError, match="signed, but by none of the trusted keys"):
            trusting.verify_cosign(Registry(reg.host), "signed", (digest,))
        # A PEM key that cannot be loaded does not stop the Vault key from vouching.
        both = ("/nonexistent/cosign.pub", "hashivault://release")
        mixed = Verifier(vault, (), str(tmp_path / "c2"), cosign_keys=both)
        assert mixed.verify_cosign(Registry(reg.host), "vaulted", (digest,)).key == both[1]


def test_pyhpc_writes_a_blob_bundle_that_cosign_verify_blob_accepts(tmp_path: Path) -> None:
    import sys

    with dev_vault() as (address, _):
        vault = Vault(address=address, auth=Auth(token=TOKEN))
        vault.setup("bundles", algorithm="ecdsa-p256")
        vault.setup("edwards")
        image = tmp_path / "image.sqsh"
        image.write_bytes(os.urandom(1 << 20))
        env = {**os.environ, "VAULT_ADDR": address, "VAULT_TOKEN": TOKEN}
        cli = [sys.executable, "-m", "nomad_driver.cli.main", "image", "--store", str(tmp_path)]
        bundle = tmp_path / "image.bundle"
        done = subprocess.run(
            [*cli, "sign", str(image), "--key", "bundles", "--cosign-bundle", str(bundle)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        pem = tmp_path / "bundles.pub"
        pem.write_text(vault.public_keys("bundles")[0][0].material)

        def verify_blob(blob: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [cosign_binary(), "verify-blob", "--key", str(pem), "--bundle", str(bundle),
                 "--insecure-ignore-tlog=true", str(blob)],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "SIGSTORE_REKOR_PUBLIC_KEY": str(pem),
                     "TUF_ROOT": str(tmp_path)},
            )  # fmt: skip

        checked = verify_blob(image)
        assert checked.returncode == 0 and "Verified OK" in checked.stderr, checked.stderr
        changed = tmp_path / "changed.sqsh"
        changed.write_bytes(image.read_bytes()[:-1] + b"\0")
        assert verify_blob(changed).returncode != 0  # the control: other bytes do not verify
        refused = subprocess.run(
            [*cli, "sign", str(image), "--key", "edwards", "--cosign-bundle", str(bundle)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "transit key edwards is ed25519" in refused.stderr.strip().splitlines()[-1]
