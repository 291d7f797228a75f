"""The one seam to Vault: log in (token, AppRole or JWT), sign with a transit key, read a
transit key's public halves, and set up the key and policies. Private keys never leave Vault."""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from typing import Any

from nomad_driver.util.errors import Unavailable

ALGORITHMS = ("ed25519", "ecdsa-p256")
SIGNER_POLICY = """# pyhpc: sign images with transit key {key}
path "{mount}/sign/{key}" {{ capabilities = ["update"] }}
path "{mount}/keys/{key}" {{ capabilities = ["read"] }}
"""
VERIFIER_POLICY = """# pyhpc: verify images (public keys only)
path "{mount}/keys/{key}" {{ capabilities = ["read"] }}
"""


class VaultError(Unavailable, RuntimeError):
    """Vault refused or could not be reached; the message says which and why."""


@dataclass(frozen=True)
class Auth:
    """How to log in: "token" (token or token_file, else $VAULT_TOKEN), "approle" (role_id and
    secret_id_file) or "jwt" (role and jwt_file, e.g. a Nomad workload identity)."""

    method: str = "token"
    token: str = ""
    token_file: str = ""
    role_id: str = ""
    secret_id_file: str = ""
    role: str = ""
    jwt_file: str = ""
    mount: str = ""  # the auth method's mount path, when not the default


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as err:
        raise VaultError(f"cannot read the {what} file {path}: {err.strerror}") from err


@dataclass(frozen=True)
class PublicKey:
    algorithm: str  # "ed25519" or "ecdsa-p256"
    version: int
    material: str  # base64 raw key (ed25519) or PEM (ecdsa)

    def verify(self, signature: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        try:
            if self.algorithm == "ed25519":
                key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(self.material))
                key.verify(signature, data)
            else:
                pem = serialization.load_pem_public_key(self.material.encode())
                if not isinstance(pem, ec.EllipticCurvePublicKey):
                    return False
                pem.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass
class Vault:
    address: str = ""
    transit: str = "transit"
    auth: Auth = field(default_factory=Auth)
    ca_file: str = ""
    namespace: str = ""
    timeout: float = 10.0
    _client: Any = None  # hvac.Client, imported on first use
    _expires: float = 0.0

    def client(self) -> Any:
        import hvac  # with requests: imported only when Vault is asked (not for every start)
        import requests

        address = self.address or os.environ.get("VAULT_ADDR", "")
        if not address:
            raise VaultError("no Vault address: set vault_address or VAULT_ADDR")
        if self._client is not None and (not self._expires or time.time() < self._expires - 60):
            return self._client
        # Vault's own variables (VAULT_CACERT, VAULT_CAPATH, VAULT_CLIENT_CERT/KEY,
        # VAULT_SKIP_VERIFY, VAULT_NAMESPACE) where the settings name none.
        env = os.environ.get
        verify: bool | str = (
            self.ca_file or env("VAULT_CACERT", "") or env("VAULT_CAPATH", "") or True
        )
        if env("VAULT_SKIP_VERIFY", "").lower() in ("1", "true"):
            verify = False
        cert = env("VAULT_CLIENT_CERT", "")
        client = hvac.Client(
            url=address,
            timeout=self.timeout,
            verify=verify,
            cert=(cert, env("VAULT_CLIENT_KEY", "")) if cert else None,
            namespace=self.namespace or env("VAULT_NAMESPACE", "") or None,
        )
        a = self.auth
        try:
            if a.method == "token":
                client.token = a.token or (
                    _read(a.token_file, "Vault token")
                    if a.token_file
                    else os.environ.get("VAULT_TOKEN", "")
                )
                if not client.token:
                    raise VaultError("no Vault token: set VAULT_TOKEN or vault_token_file")
                ttl = int(client.auth.token.lookup_self()["data"].get("ttl") or 0)
                if ttl and ttl < 3600 and client.auth.token.lookup_self()["data"].get("renewable"):
                    ttl = int(client.auth.token.renew_self()["auth"]["lease_duration"])
            elif a.method == "approle":
                login = client.auth.approle.login(
                    a.role_id,
                    _read(a.secret_id_file, "AppRole secret_id"),
                    mount_point=a.mount or "approle",
                )
                ttl = int(login["auth"]["lease_duration"])
            elif a.method == "jwt":
                login = client.auth.jwt.jwt_login(
                    a.role, _read(a.jwt_file, "JWT"), path=a.mount or "jwt"
                )
                ttl = int(login["auth"]["lease_duration"])
            else:
                raise VaultError(f"unknown Vault auth method {a.method!r} (token, approle, jwt)")
        except hvac.exceptions.VaultError as err:
            raise VaultError(f"Vault at {address}: login ({a.method}) refused: {err}") from err
        except requests.RequestException as err:
            raise VaultError(f"Vault at {address} is unreachable: {err}") from err
        self._client, self._expires = client, (time.time() + ttl if ttl else 0.0)
        return client

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        import hvac
        import requests

        try:
            return fn(*args, **kw)
        except hvac.exceptions.VaultError as err:
            raise VaultError(f"Vault: {what}: {err}") from err
        except requests.RequestException as err:
            raise VaultError(f"Vault is unreachable ({what}): {err}") from err

    def sign(self, key: str, data: bytes, prehashed: bool = False) -> tuple[bytes, int]:
        """(signature, key version) of data by transit key `key`. prehashed: data is the
        SHA-256 digest of what is signed (Vault's prehashed signing: ECDSA keys only)."""
        transit = self.client().secrets.transit
        reply = self._call(
            f"signing with {self.transit}/{key}",
            transit.sign_data,
            key,
            hash_input=base64.b64encode(data).decode(),
            hash_algorithm="sha2-256",
            mount_point=self.transit,
            **({"prehashed": True} if prehashed else {}),
        )
        text = reply["data"]["signature"]  # "vault:v3:BASE64"
        _, version, sig = text.split(":", 2)
        return base64.b64decode(sig), int(version.lstrip("v"))

    def public_keys(self, key: str) -> tuple[list[PublicKey], int]:
        """Every version's public key, and the lowest version still accepted."""
        transit = self.client().secrets.transit
        data = self._call(
            f"reading {self.transit}/keys/{key}", transit.read_key, key, mount_point=self.transit
        )["data"]
        algorithm = str(data.get("type"))
        if algorithm not in ALGORITHMS:
            raise VaultError(
                f"transit key {key} is {algorithm}, not a signing key ({', '.join(ALGORITHMS)})"
            )
        keys = [
            PublicKey(algorithm, int(v), str(info["public_key"]))
            for v, info in data["keys"].items()
            if isinstance(info, dict)
        ]
        return keys, int(data.get("min_decryption_version") or 1)

    def setup(self, key: str, algorithm: str = "ed25519") -> dict[str, str]:
        """Create the transit engine and a non-exportable key if missing; write the signer and
        verifier policies. Returns the policy names and texts."""
        import hvac

        client = self.client()
        mounts = self._call("listing secret engines", client.sys.list_mounted_secrets_engines)
        if f"{self.transit}/" not in mounts.get("data", mounts):
            self._call(
                "enabling transit", client.sys.enable_secrets_engine, "transit", path=self.transit
            )
        transit = client.secrets.transit
        try:
            existing = transit.read_key(key, mount_point=self.transit)["data"]
        except hvac.exceptions.InvalidPath:
            existing = None
        if existing is None:
            self._call(
                f"creating {key}",
                transit.create_key,
                key,
                key_type=algorithm,
                exportable=False,
                allow_plaintext_backup=False,
                mount_point=self.transit,
            )
        elif existing.get("exportable"):
            raise VaultError(f"transit key {key} is exportable; pyhpc refuses such a key")
        policies = {
            f"pyhpc-signer-{key}": SIGNER_POLICY.format(mount=self.transit, key=key),
            f"pyhpc-verifier-{key}": VERIFIER_POLICY.format(mount=self.transit, key=key),
        }
        for name, text in policies.items():
            self._call(f"writing policy {name}", client.sys.create_or_update_policy, name, text)
        return policies
