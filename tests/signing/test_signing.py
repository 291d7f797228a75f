"""Signing with keys that stay in a real Vault's transit engine, verifying before use."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

from nomad_driver.signing import envelope
from nomad_driver.signing.vault import Auth, Vault, VaultError
from nomad_driver.signing.verify import SignatureError, Verifier, mode_for, sign
from tests.vaultbed import TOKEN, dev_vault


@pytest.fixture(scope="module")
def vault() -> Iterator[Vault]:
    with dev_vault() as (address, _):
        v = Vault(address=address, auth=Auth(token=TOKEN))
        v.setup("images")
        v.setup("other")
        v.setup("p256", algorithm="ecdsa-p256")
        yield v


def image(tmp: Path, name: str, content: bytes = b"") -> Path:
    path = tmp / name
    path.write_bytes(content or os.urandom(4096))
    return path


def verifier(vault: Vault, tmp: Path, *keys: str, ttl: float = 300) -> Verifier:
    return Verifier(vault, keys or ("images",), str(tmp / "cache"), ttl=ttl)


def test_setup_makes_a_key_that_cannot_be_exported(vault: Vault) -> None:
    client = vault.client()
    assert client.secrets.transit.read_key("images")["data"]["exportable"] is False
    with pytest.raises(hvac.exceptions.VaultError):
        client.secrets.transit.export_key("images", key_type="signing-key")
    policies = client.sys.list_policies()["data"]["policies"]
    assert "pyhpc-signer-images" in policies and "pyhpc-verifier-images" in policies


@pytest.mark.parametrize("key", ["images", "p256"])
def test_signed_image_verifies_and_names_key_and_version(
    vault: Vault, tmp_path: Path, key: str
) -> None:
    img = image(tmp_path, "a.sqsh")
    payload = sign(vault, str(img), "docker://r:5000/a:1", key)
    got = verifier(vault, tmp_path, key).verify(str(img), "docker://r:5000/a:1")
    assert (got.key, got.version, got.digest) == (
        f"transit/{key}",
        payload.key_version,
        payload.digest,
    )
    text = (tmp_path / "a.sqsh.dsse.json").read_text()
    assert (
        "PRIVATE" not in text
        and '"payloadType": "application/vnd.pyhpc.image-signature.v1+json"' in text
    )


def test_each_bad_image_is_refused_with_its_own_message(vault: Vault, tmp_path: Path) -> None:
    check = verifier(vault, tmp_path)
    unsigned = image(tmp_path, "unsigned.sqsh")
    with pytest.raises(SignatureError, match="is not signed"):
        check.verify(str(unsigned), "unsigned")

    flipped = image(tmp_path, "flipped.sqsh")
    sign(vault, str(flipped), "flipped", "images")
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x01
    flipped.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="the image changed since it was signed"):
        check.verify(str(flipped), "flipped")

    stranger = image(tmp_path, "stranger.sqsh")
    sign(vault, str(stranger), "stranger", "other")
    with pytest.raises(SignatureError, match="transit/other v1, a key this node does not trust"):
        check.verify(str(stranger), "stranger")

    forged = image(tmp_path, "forged.sqsh")
    sign(vault, str(forged), "forged", "other")
    text = (
        (tmp_path / "forged.sqsh.dsse.json").read_text().replace("transit/other", "transit/images")
    )
    (tmp_path / "forged.sqsh.dsse.json").write_text(text)
    with pytest.raises(SignatureError, match="does not verify with transit/images"):
        check.verify(str(forged), "forged")

    mine, theirs = image(tmp_path, "mine.sqsh"), image(tmp_path, "theirs.sqsh")
    sign(vault, str(theirs), "theirs", "images")
    shutil.copy(tmp_path / "theirs.sqsh.dsse.json", tmp_path / "mine.sqsh.dsse.json")
    with pytest.raises(SignatureError, match=r"belongs to another image \(theirs"):
        check.verify(str(mine), "mine")


def test_rotation_keeps_old_signatures_until_the_minimum_is_raised(
    vault: Vault, tmp_path: Path
) -> None:
    client = vault.client()
    client.secrets.transit.create_key("rotating", key_type="ed25519")
    old, new = image(tmp_path, "old.sqsh"), image(tmp_path, "new.sqsh")
    assert sign(vault, str(old), "old", "rotating").key_version == 1
    client.secrets.transit.rotate_key("rotating")
    assert sign(vault, str(new), "new", "rotating").key_version == 2
    check = verifier(vault, tmp_path, "rotating", ttl=0)
    assert check.verify(str(old), "old").version == 1
    assert check.verify(str(new), "new").version == 2
    client.secrets.transit.update_key_configuration("rotating", min_decryption_version=2)
    with pytest.raises(SignatureError, match="v1, below the key's minimum version 2"):
        check.verify(str(old), "old")
    assert check.verify(str(new), "new").version == 2


def test_vault_down_cached_keys_keep_verifying_and_no_cache_fails_closed(tmp_path: Path) -> None:
    with dev_vault() as (address, proc):
        v = Vault(address=address, auth=Auth(token=TOKEN))
        v.setup("images")
        img = image(tmp_path, "i.sqsh")
        sign(v, str(img), "i", "images")
        warm = verifier(v, tmp_path, ttl=0)
        warm.verify(str(img), "i")
        proc.kill()
        proc.wait()
        assert warm.verify(str(img), "i").version == 1  # from the cache, however old
        restarted = Verifier(v, ("images",), str(tmp_path / "cache"), ttl=0)
        assert restarted.verify(str(img), "i").version == 1  # the on-disk cache
        cold = Verifier(v, ("images",), str(tmp_path / "empty"), ttl=0)
        with pytest.raises(SignatureError, match="no cached public key for images"):
            cold.verify(str(img), "i")


def test_signing_and_verifying_over_tls_with_vaults_own_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vault behind TLS: the CA from the plugin's vault_ca_file or from VAULT_CACERT; without
    it, one line saying the certificate was not trusted. (Vault namespaces are Vault
    Enterprise's; this open-source build has none to test: VAULT_NAMESPACE is passed through.)"""
    certs = tmp_path / "tls"
    certs.mkdir()
    with dev_vault(str(certs)) as (address, _):
        ca = str(certs / "vault-ca.pem")
        v = Vault(address=address, auth=Auth(token=TOKEN), ca_file=ca)
        v.setup("images")
        img = image(tmp_path, "t.sqsh")
        payload = sign(v, str(img), "t", "images")
        monkeypatch.setenv("VAULT_ADDR", address)
        monkeypatch.setenv("VAULT_TOKEN", TOKEN)
        monkeypatch.setenv("VAULT_CACERT", ca)
        from_env = Vault()
        assert verifier(from_env, tmp_path).verify(str(img), "t").digest == payload.digest
        monkeypatch.delenv("VAULT_CACERT")
        with pytest.raises(VaultError, match=f"Vault at {address}.*(?i:certificate)") as err:
            Vault().public_keys("images")
        assert "\n" not in str(err.value)


def test_bad_credentials_are_reported(vault: Vault) -> None:
    with pytest.raises(VaultError, match="login \\(token\\) refused"):
        Vault(address=vault.address, auth=Auth(token="not-a-token")).public_keys("images")


def test_rules_pick_the_longest_prefix() -> None:
    rules = ("docker://r:5000/=warn", "docker://r:5000/prod/=enforce", "/scratch/=off")
    assert mode_for("docker://r:5000/prod/app:1", "off", rules) == "enforce"
    assert mode_for("docker://r:5000/dev/app:1", "off", rules) == "warn"
    assert mode_for("/var/lib/pyhpc/images/x.sqsh", "enforce", rules) == "enforce"


def test_envelope_round_trip(tmp_path: Path) -> None:
    payload = envelope.Payload("sha256:" + "0" * 64, "ref", "transit/k", 3, "now")
    assert envelope.Payload.from_bytes(payload.to_bytes()) == payload
    assert envelope.pae("t", b"abc") == b"DSSEv1 1 t 3 abc"
    assert envelope.parse_keyid(envelope.keyid("transit/k", 3)) == ("transit/k", 3)


def test_the_signature_survives_push_and_pull(
    vault: Vault, tmp_path: Path, busybox_image: Path
) -> None:
    from nomad_driver.images import publish
    from nomad_driver.images.store import Store
    from tests.registry import run_registry

    store = Store(str(tmp_path / "store"))
    stored = store.ensure(str(busybox_image))
    sign(vault, stored.path, str(busybox_image), "images")
    with run_registry(tmp_path / "registry") as reg:
        publish.push(stored, f"oras://{reg.host}/signed/busybox:1")
        other = Store(str(tmp_path / "other")).ensure(f"oras://{reg.host}/signed/busybox:1")
    assert other.digest == stored.digest
    got = verifier(vault, tmp_path).verify(other.path, f"oras://{reg.host}/signed/busybox:1")
    assert got.key == "transit/images"


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_approle_and_jwt_logins_can_verify(vault: Vault, tmp_path: Path) -> None:
    """The plugin's other ways in: AppRole, and a JWT (as a Nomad workload identity is)."""
    import json
    import time

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    client = vault.client()
    img = image(tmp_path, "i.sqsh")
    sign(vault, str(img), "i", "images")

    client.sys.enable_auth_method("approle")
    client.auth.approle.create_or_update_approle(
        "node", token_policies=["pyhpc-verifier-images"], token_ttl="10m"
    )
    role_id = client.auth.approle.read_role_id("node")["data"]["role_id"]
    (tmp_path / "secret-id").write_text(
        client.auth.approle.generate_secret_id("node")["data"]["secret_id"]
    )
    approle = Vault(
        vault.address,
        auth=Auth(method="approle", role_id=role_id, secret_id_file=str(tmp_path / "secret-id")),
    )
    assert Verifier(approle, ("images",), str(tmp_path / "c1")).verify(str(img), "i").version == 1

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    client.sys.enable_auth_method("jwt")
    client.write("auth/jwt/config", jwt_validation_pubkeys=[pem])
    client.write(
        "auth/jwt/role/node",
        role_type="jwt",
        user_claim="sub",
        bound_audiences=["vault.io"],
        token_policies=["pyhpc-verifier-images"],
    )
    now = int(time.time())
    claims = {"sub": "nomad-task", "aud": "vault.io", "iat": now, "nbf": now, "exp": now + 600}
    head = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims).encode())
    sig = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    (tmp_path / "jwt").write_text(f"{head}.{body}.{_b64url(sig)}")
    jwt = Vault(vault.address, auth=Auth(method="jwt", role="node", jwt_file=str(tmp_path / "jwt")))
    assert Verifier(jwt, ("images",), str(tmp_path / "c2")).verify(str(img), "i").version == 1
    # The verifier policy reads public keys only: signing is refused.
    with pytest.raises(VaultError, match="permission denied"):
        jwt.sign("images", b"data")


def test_a_registry_rule_covers_every_transport_to_that_repository() -> None:
    """The attack (red team): the same repository pushed as oras:// escaped a docker:// rule
    (rules compared transport text), so unsigned bytes ran under "enforce" and "cosign"."""
    rules = ("docker://reg:5000/signed/=enforce", "oras://reg:5000/cosigned/=cosign")
    assert mode_for("oras://reg:5000/signed/evil:1", "off", rules) == "enforce"
    assert mode_for("docker://reg:5000/cosigned/app:1", "off", rules) == "cosign"
    assert mode_for("docker://reg:5000/signed/app:1", "off", rules) == "enforce"
    assert mode_for("oras://reg:5000/other/app:1", "off", rules) == "off"  # the control
    assert mode_for("oci:/srv/signed/app", "off", rules) == "off"
    # Nor does the host's case (red team: REGISTRY.example ran unsigned under enforce).
    assert mode_for("docker://REG:5000/signed/evil:1", "off", rules) == "enforce"
    assert mode_for("docker://reg:5000/signed/x:1", "off", ("docker://Reg:5000/=enforce",)) == (
        "enforce"
    )
    from nomad_driver.images import reference

    assert str(reference.parse("docker://Registry.Example.ORG:5000/team/app:1")) == (
        "docker://registry.example.org:5000/team/app:1"
    )
