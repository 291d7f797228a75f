"""cosign's image signatures, checked with the site's keys, so that a site that signs its OCI
images with cosign keeps that supply chain.

cosign (key-based, no transparency log) stores the signatures of manifest sha256:HEX as an OCI
image tagged `sha256-HEX.sig` in the image's repository: each layer is a "simple signing"
payload (JSON naming the manifest digest), its signature base64 in the layer's
`dev.cosignproject.cosign/signature` annotation. A key is a PEM public key file (ECDSA, RSA or
Ed25519, as `cosign generate-key-pair` writes) or a Vault transit key, cosign's
`hashivault://NAME`, whose public key Vault gives. The digest checked is the one the import
pulled (the tag's index, then the platform manifest), recorded with the SquashFS, so the
task's check is about the very bytes it runs.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nomad_driver.images.registry import Registry, RegistryError
from nomad_driver.util.errors import Refused

SIGNATURE_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
VAULT_SCHEME = "hashivault://"
MAX_SIGNATURES = 32  # layers looked at per signature manifest
MAX_PAYLOAD = 64 << 10

# (signature, payload) -> whether the key made it
Check = Callable[[bytes, bytes], bool]


class CosignError(Refused, RuntimeError):
    """No trusted cosign signature; the message says what was found instead."""


@dataclass(frozen=True)
class CosignVerified:
    manifest_digest: str
    key: str  # as configured: a PEM path or hashivault://NAME
    docker_reference: str  # what the payload names (informational, as for cosign itself)


def signature_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


def pem_check(path: str) -> Check:
    """The verifier of a PEM public key file, which must be root's and writable by no one
    else (a key a tenant could replace would let the tenant sign)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise CosignError(f"cosign key {path}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise CosignError(
                f"cosign key {path} must be a regular file owned by root and writable by no one "
                f"else (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o})"
            )
        data = os.read(fd, 64 << 10)
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise CosignError(f"cosign key {path} is not a PEM public key") from err

    def check(signature: bytes, payload: bytes) -> bool:
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, payload)
            else:
                return False
        except (InvalidSignature, ValueError):
            return False
        return True

    return check


def _payload(data: bytes, where: str) -> tuple[str, str]:
    """(manifest digest, docker-reference) a simple-signing payload names."""
    try:
        body = json.loads(data)
        critical = body["critical"]
        kind = critical["type"]
        digest = str(critical["image"]["docker-manifest-digest"])
        named = str(critical.get("identity", {}).get("docker-reference", ""))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CosignError(f"{where}: not a cosign signature payload") from err
    if kind != PAYLOAD_TYPE:
        raise CosignError(f"{where}: payload type {kind!r}, not {PAYLOAD_TYPE!r}")
    return digest, named


def verify(
    registry: Registry,
    repository: str,
    digests: Sequence[str],
    keys: Sequence[tuple[str, Check]],
) -> CosignVerified:
    """A signature, by one of keys, of one of digests (the tag's first), found at cosign's
    signature tags in repository. CosignError lists what each digest had."""
    problems: list[str] = []
    for digest in dict.fromkeys(d for d in digests if d):
        where = f"{registry.host}/{repository}:{signature_tag(digest)}"
        try:
            body, _, _ = registry.manifest(repository, signature_tag(digest))
        except RegistryError as err:
            problems.append(
                f"no cosign signature for {digest[:19]} ({where} not found)"
                if "HTTP 404" in str(err)
                else str(err)
            )
            continue
        try:
            layers = json.loads(body).get("layers") or []
        except (ValueError, AttributeError):
            problems.append(f"{where}: not a signature manifest")
            continue
        for layer in layers[:MAX_SIGNATURES]:
            if not isinstance(layer, dict) or layer.get("mediaType") != SIGNATURE_LAYER:
                continue
            try:
                signature = base64.b64decode(
                    str((layer.get("annotations") or {})[SIGNATURE_ANNOTATION]), validate=True
                )
            except (KeyError, binascii.Error):
                problems.append(f"{where}: a layer without a base64 signature annotation")
                continue
            payload = registry.blob_bytes(repository, str(layer.get("digest")), MAX_PAYLOAD)
            signed_digest, named = _payload(payload, where)
            if signed_digest != digest:
                problems.append(f"{where}: a signature of another digest ({signed_digest[:19]})")
                continue
            signer = next((name for name, check in keys if check(signature, payload)), None)
            if signer is not None:
                return CosignVerified(digest, signer, named)
            problems.append(f"{where}: signed, but by none of the trusted keys")
    trusted = ", ".join(name for name, _ in keys) or "none"
    raise CosignError("; ".join(dict.fromkeys(problems)) + f" (trusted cosign keys: {trusted})")


def blob_bundle(signature: bytes) -> str:
    """A key-based bundle `cosign verify-blob --key PEM --bundle FILE --insecure-ignore-tlog`
    accepts for the blob the signature is over (no certificate, no transparency log entry)."""
    return json.dumps({"base64Signature": base64.b64encode(signature).decode()})
