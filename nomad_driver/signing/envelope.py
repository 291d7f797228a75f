"""The signature format: a DSSE envelope (in-toto's Dead Simple Signing Envelope) whose payload
binds an image's SquashFS digest, its reference, and the key (name and version) that signed.

    {"payloadType": "application/vnd.pyhpc.image-signature.v1+json",
     "payload": base64(JSON payload),
     "signatures": [{"keyid": "vault:transit/KEY:vN", "sig": base64(signature)}]}

The signature is over PAE(payloadType, payload), as DSSE specifies, so the type cannot be
swapped. The envelope lives beside the image, in IMAGE.dsse.json.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

PAYLOAD_TYPE = "application/vnd.pyhpc.image-signature.v1+json"
SUFFIX = ".dsse.json"
MAX_BYTES = 1 << 20


class EnvelopeError(ValueError):
    pass


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True)
class Payload:
    digest: str
    reference: str
    key: str  # "transit-mount/key-name"
    key_version: int
    signed_at: str

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        try:
            raw: dict[str, Any] = json.loads(data)
            return cls(
                str(raw["digest"]),
                str(raw["reference"]),
                str(raw["key"]),
                int(raw["key_version"]),
                str(raw.get("signed_at", "")),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise EnvelopeError(f"malformed signature payload ({err})") from err


def keyid(key: str, version: int) -> str:
    return f"vault:{key}:v{version}"


def parse_keyid(text: str) -> tuple[str, int] | None:
    if not text.startswith("vault:") or ":v" not in text:
        return None
    key, _, version = text[len("vault:") :].rpartition(":v")
    return (key, int(version)) if version.isdigit() else None


def path_for(image: str) -> str:
    return image + SUFFIX


def read(image: str) -> dict[str, Any] | None:
    """The envelope beside image, or None if there is none."""
    try:
        # Beside a tenant's image it is the tenant's file: never a FIFO, device or endless one.
        fd = os.open(path_for(image), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        envelope = json.loads(raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise EnvelopeError(f"{path_for(image)}: unreadable signature file ({err})") from err
    if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
        raise EnvelopeError(f"{path_for(image)}: not a pyhpc image signature")
    return envelope


def add_signature(image: str, payload: Payload, signature: bytes) -> None:
    """Write (or extend) the envelope beside image, atomically."""
    from nomad_driver.util.files import write_atomic

    body = payload.to_bytes()
    envelope = read(image) or {"payloadType": PAYLOAD_TYPE, "signatures": []}
    old_payload = envelope.get("payload")
    entry = {
        "keyid": keyid(payload.key, payload.key_version),
        "sig": base64.b64encode(signature).decode(),
    }
    if old_payload is not None and base64.b64decode(old_payload) != body:
        envelope["signatures"] = []  # a new payload: older signatures were of other bytes
    envelope["payload"] = base64.b64encode(body).decode()
    envelope["signatures"] = [s for s in envelope["signatures"] if s.get("keyid") != entry["keyid"]]
    envelope["signatures"].append(entry)
    write_atomic(path_for(image), json.dumps(envelope, indent=1))
    os.chmod(path_for(image), 0o644)
