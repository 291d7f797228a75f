"""Checking an image's signature before it is mounted, and the trust policy around it.

Public keys come from Vault (every version of each trusted transit key) and are cached, in
memory and in a root-only directory, for `ttl` seconds; when Vault cannot be reached the cache
keeps verifying, however old, and with no cached key the check fails (never open). The image
digest comes from the digest cache, so an unchanged image is not hashed again.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from nomad_driver.runtime.imagefile import ImageFile
from nomad_driver.signing import envelope, mode_for  # noqa: F401 - mode_for: its old home
from nomad_driver.signing.vault import PublicKey, Vault, VaultError
from nomad_driver.util.digest import fd_digest, file_digest
from nomad_driver.util.errors import Refused


def cache_dir(run_dir: str) -> str:
    """Where a node with this run_dir caches public keys and image digests (root-only)."""
    return os.path.join(run_dir, "signing")


class SignatureError(Refused, RuntimeError):
    """The image failed a check; the message names the check."""


@dataclass(frozen=True)
class Verified:
    digest: str
    key: str
    version: int
    signed_at: str
    reference: str


@dataclass
class Verifier:
    vault: Vault
    keys: tuple[str, ...]  # trusted transit key names
    cache_dir: str  # root-only: public keys and image digests
    ttl: float = 300.0
    cosign_keys: tuple[str, ...] = ()  # PEM paths and hashivault://NAME
    _memory: dict[str, tuple[float, list[PublicKey], int]] = field(default_factory=dict)
    _cosigned: dict[tuple[str, ...], tuple[float, Any]] = field(default_factory=dict)

    def _cached_path(self, key: str) -> str:
        return os.path.join(self.cache_dir, "keys", f"{self.vault.transit}-{key}.json")

    def public_keys(self, key: str) -> tuple[list[PublicKey], int]:
        now = time.time()
        hit = self._memory.get(key)
        if hit and now - hit[0] < self.ttl:
            return hit[1], hit[2]
        try:
            keys, minimum = self.vault.public_keys(key)
        except VaultError as err:
            stale = hit or self._load(key)
            if stale is None:
                raise SignatureError(
                    f"cannot check the signature: {err}; and no cached public key for {key}"
                ) from err
            return stale[1], stale[2]
        self._memory[key] = (now, keys, minimum)
        self._save(key, keys, minimum)
        return keys, minimum

    def _load(self, key: str) -> tuple[float, list[PublicKey], int] | None:
        try:
            with open(self._cached_path(key), encoding="utf-8") as f:
                raw = json.load(f)
            keys = [PublicKey(**k) for k in raw["keys"]]
            return float(raw["fetched"]), keys, int(raw["min_version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save(self, key: str, keys: list[PublicKey], minimum: int) -> None:
        from nomad_driver.util.files import write_atomic

        os.makedirs(os.path.dirname(self._cached_path(key)), mode=0o700, exist_ok=True)
        write_atomic(
            self._cached_path(key),
            json.dumps(
                {"fetched": time.time(), "min_version": minimum, "keys": [k.__dict__ for k in keys]}
            ),
        )

    def verify(self, opened: ImageFile | str, reference: str) -> Verified:
        """Check the signature of the image open at opened.fd: its digest is hashed from that
        descriptor, the one the loop device is attached from (a path: a file the caller trusts,
        as `pyhpc image verify` names it). Raise SignatureError naming the failed check."""
        if isinstance(opened, str):
            fd = os.open(opened, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return self.verify(ImageFile(fd, opened, os.fstat(fd)), reference)
            finally:
                os.close(fd)
        image = opened.origin or opened.path  # a copy's envelope sits beside its original
        try:
            envelopes = envelope.read_all(image)
        except envelope.EnvelopeError as err:
            raise SignatureError(str(err)) from err
        if not envelopes:
            raise SignatureError(f"image {reference} is not signed (no {envelope.path_for(image)})")

        # The same bytes may be signed under several references: any of them, signed by a key
        # this node trusts, vouches for the digest. The one named is tried first.
        def named_first(env: dict[str, Any]) -> bool:
            payload = envelope.payload_of(env)
            return payload is None or payload.reference != reference

        problems: list[str] = []
        for env in sorted(envelopes, key=named_first):
            verified = self._check(env, opened, image, reference, problems)
            if verified is not None:
                return verified
        unique = list(dict.fromkeys(problems)) or ["no signatures"]
        raise SignatureError(f"image {reference}: " + "; ".join(unique))

    def _check(
        self,
        env: dict[str, Any],
        opened: ImageFile,
        image: str,
        reference: str,
        problems: list[str],
    ) -> Verified | None:
        """What one envelope proves about the image open at opened.fd; its failures are
        appended to problems."""
        try:
            body = base64.b64decode(env["payload"])
            signatures = list(env["signatures"])
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{envelope.path_for(image)}: malformed envelope ({err})")
            return None
        signed = envelope.pae(envelope.PAYLOAD_TYPE, body)
        for entry in signatures:
            parsed = envelope.parse_keyid(str(entry.get("keyid", "")))
            if parsed is None:
                problems.append(f"unknown key id {entry.get('keyid')!r}")
                continue
            qualified, version = parsed
            mount, _, name = qualified.rpartition("/")
            if mount != self.vault.transit or name not in self.keys:
                problems.append(
                    f"signed by {qualified} v{version}, a key this node does not trust "
                    f"(trusted: {', '.join(f'{self.vault.transit}/{k}' for k in self.keys)})"
                )
                continue
            keys, minimum = self.public_keys(name)
            if version < minimum:
                problems.append(
                    f"signed with {qualified} v{version}, below the key's minimum version {minimum}"
                )
                continue
            public = next((k for k in keys if k.version == version), None)
            if public is None or not public.verify(base64.b64decode(entry.get("sig", "")), signed):
                problems.append(
                    f"the signature does not verify with {qualified} v{version} "
                    "(forged, or made by another key)"
                )
                continue
            try:
                payload = envelope.Payload.from_bytes(body)
            except envelope.EnvelopeError as err:
                problems.append(str(err))
                continue
            if payload.key != qualified or payload.key_version != version:
                problems.append("the payload names another key than the one that signed it")
                continue
            digest = fd_digest(opened.fd, os.path.join(self.cache_dir, "digests"))
            if payload.digest != digest:
                if payload.reference not in (reference, image):
                    problems.append(
                        f"the signature belongs to another image ({payload.reference}, "
                        f"{payload.digest[:19]}), not this one ({digest[:19]})"
                    )
                else:
                    problems.append(
                        f"the image changed since it was signed: signed {payload.digest[:19]}, "
                        f"now {digest[:19]}"
                    )
                continue
            return Verified(digest, qualified, version, payload.signed_at, payload.reference)
        return None

    def verify_cosign(self, registry: Any, repository: str, digests: tuple[str, ...]) -> Any:
        """A cosign signature of digests by one of cosign_keys (cosign.verify), believed for
        ttl seconds: a start does not ask the registry again each time."""
        from nomad_driver.signing import cosign

        key = (registry.host, repository, *digests)
        hit = self._cosigned.get(key)
        if hit and time.time() - hit[0] < self.ttl:
            return hit[1]
        checks: list[tuple[str, cosign.Check]] = []
        unusable: list[str] = []  # keys that could not be loaded: the others still count
        for name in self.cosign_keys:
            try:
                if name.startswith(cosign.VAULT_SCHEME):
                    versions, minimum = self.public_keys(name[len(cosign.VAULT_SCHEME) :])
                    checks += [(name, k.verify) for k in versions if k.version >= minimum]
                else:
                    checks.append((name, cosign.pem_check(name)))
            except (SignatureError, cosign.CosignError) as err:
                unusable.append(str(err))
        if not checks:
            raise cosign.CosignError(
                "; ".join(unusable) or "no cosign_keys are configured on this node"
            )
        try:
            verified = cosign.verify(registry, repository, digests, checks)
        except cosign.CosignError as err:
            raise cosign.CosignError("; ".join([str(err), *unusable])) from err
        if len(self._cosigned) > 1024:
            self._cosigned.clear()
        self._cosigned[key] = (time.time(), verified)
        return verified


def sign(vault: Vault, image: str, reference: str, key: str) -> envelope.Payload:
    """Sign image (its digest and reference) with transit key `key`; write the envelope."""
    digest = file_digest(image)
    # The version is known only once Vault signed: ask for the latest, then sign the payload
    # that names it (a rotation in between makes the check below fail loudly).
    keys, _ = vault.public_keys(key)
    version = max(k.version for k in keys)
    payload = envelope.Payload(
        digest=digest,
        reference=reference,
        key=f"{vault.transit}/{key}",
        key_version=version,
        signed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    signature, used = vault.sign(key, envelope.pae(envelope.PAYLOAD_TYPE, payload.to_bytes()))
    if used != version:
        raise VaultError(f"transit key {key} rotated while signing (v{version} -> v{used}); retry")
    envelope.add_signature(image, payload, signature)
    return payload


def describe(verified: Verified) -> dict[str, Any]:
    return {
        "digest": verified.digest,
        "key": verified.key,
        "key_version": verified.version,
        "signed_at": verified.signed_at,
        "signed_reference": verified.reference,
    }
