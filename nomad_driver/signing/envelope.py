"""The signature format: a DSSE envelope (in-toto's Dead Simple Signing Envelope) whose payload
binds an image's SquashFS digest, its reference, and the key (name and version) that signed.

    {"payloadType": "application/vnd.pyhpc.image-signature.v1+json",
     "payload": base64(JSON payload),
     "signatures": [{"keyid": "vault:transit/KEY:vN", "sig": base64(signature)}]}

The signature is over PAE(payloadType, payload), as DSSE specifies, so the type cannot be
swapped. The envelope lives beside the image, in IMAGE.dsse.json. One image (one digest) may be
signed under several references (docker://reg/app:1 and oci:/srv/app:1 are the same bytes):
then the file holds a JSON list of envelopes, one per reference and key.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

from nomad_driver.util.errors import Refused

PAYLOAD_TYPE = "application/vnd.pyhpc.image-signature.v1+json"
SUFFIX = ".dsse.json"
MAX_BYTES = 1 << 20


class EnvelopeError(Refused, ValueError):
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
    """The (first) envelope beside image, or None if there is none."""
    envelopes = read_all(image)
    return envelopes[0] if envelopes else None


def read_all(image: str) -> list[dict[str, Any]]:
    """Every envelope beside image ([] if there is none)."""
    try:
        # Beside a tenant's image it is the tenant's file: never a FIFO, device or endless one.
        fd = os.open(path_for(image), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        content = json.loads(raw)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise EnvelopeError(f"{path_for(image)}: unreadable signature file ({err})") from err
    envelopes = content if isinstance(content, list) else [content]
    if not envelopes or not all(
        isinstance(e, dict) and e.get("payloadType") == PAYLOAD_TYPE for e in envelopes
    ):
        raise EnvelopeError(f"{path_for(image)}: not a pyhpc image signature")
    return envelopes


def payload_of(envelope: dict[str, Any]) -> Payload | None:
    """The payload an envelope carries, None if it is malformed (unverified: see verify)."""
    try:
        return Payload.from_bytes(base64.b64decode(envelope["payload"]))
    except (KeyError, TypeError, ValueError):
        return None


def add_signature(image: str, payload: Payload, signature: bytes) -> None:
    """Add the signed payload to the envelopes beside image, atomically. It replaces an older
    one of the same reference and key; those of other references of the same digest stay;
    those of another digest go (they were of other bytes)."""
    from nomad_driver.util.files import write_atomic

    kept = []
    for old in read_all(image):
        other = payload_of(old)
        if other is None or other.digest != payload.digest:
            continue
        if (other.reference, other.key) != (payload.reference, payload.key):
            kept.append(old)
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload.to_bytes()).decode(),
        "signatures": [
            {
                "keyid": keyid(payload.key, payload.key_version),
                "sig": base64.b64encode(signature).decode(),
            }
        ],
    }
    envelopes = [*kept, envelope]
    content = envelopes[0] if len(envelopes) == 1 else envelopes  # one: plain DSSE, as before
    write_atomic(path_for(image), json.dumps(content, indent=1))
    os.chmod(path_for(image), 0o644)
