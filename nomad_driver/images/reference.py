"""Image references, as users write them in `pyhpc image import` and a task's `image`.

    docker://HOST[:PORT]/REPO[:TAG][@sha256:HEX]   an OCI distribution registry
    oras://HOST[:PORT]/REPO[:TAG][@sha256:HEX]     a SquashFS pushed as an OCI artifact
    oci:DIR[:REF]                                 an OCI image layout directory (skopeo's syntax)
    oci-archive:FILE[:REF]                        the same, as a tar file
    docker-archive:FILE                           the output of `docker save`
    dir:ROOTFS                                    a root file system directory
    /PATH.sqsh                                    a SquashFS file

The registry host is always written out: there is no default registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRANSPORTS = ("docker", "oras", "oci", "oci-archive", "docker-archive", "dir", "file")
_REPO = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:localhost|[A-Za-z0-9.-]+\.[A-Za-z0-9-]+|\[[0-9a-fA-F:]+\]|[0-9.]+)(?::[0-9]{1,5})?$"
)


class ReferenceError(ValueError):
    """The reference is malformed; the message says which part and what is accepted."""


@dataclass(frozen=True)
class Reference:
    transport: str
    path: str = ""  # oci, oci-archive, docker-archive, dir, file
    registry: str = ""  # docker, oras
    repository: str = ""
    tag: str = ""
    digest: str = ""  # sha256:..., when pinned

    def __str__(self) -> str:
        if self.transport in ("docker", "oras"):
            text = f"{self.transport}://{self.registry}/{self.repository}"
            text += f":{self.tag}" if self.tag else ""
            return text + (f"@{self.digest}" if self.digest else "")
        if self.transport == "file":
            return self.path
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")

    @property
    def remote(self) -> bool:
        return self.transport in ("docker", "oras")


def parse(text: str) -> Reference:
    text = text.strip()
    if not text:
        raise ReferenceError("image reference is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ReferenceError(f"image {text!r} contains control characters")
    if text.startswith("/"):
        return Reference("file", path=text)
    for transport in ("docker", "oras"):
        if text.startswith(f"{transport}://"):
            return _parse_remote(transport, text[len(transport) + 3 :], text)
    transport, sep, rest = text.partition(":")
    if transport in ("docker", "oras"):
        raise ReferenceError(f"image {text!r}: expected {transport}://HOST/REPOSITORY[:TAG]")
    if not sep or transport not in TRANSPORTS:
        raise ReferenceError(
            f"image {text!r}: expected an absolute SquashFS path or docker://, oras://, oci:, "
            "oci-archive:, docker-archive: or dir:"
        )
    path, tag = rest, ""
    if transport in ("oci", "oci-archive") and ":" in rest:
        path, _, tag = rest.rpartition(":")
        if not tag:
            raise ReferenceError(f"image {text!r}: empty tag after ':'")
    if not path.startswith("/"):
        raise ReferenceError(f"image {text!r}: {transport}: needs an absolute path")
    return Reference(transport, path=path, tag=tag)


def _parse_remote(transport: str, rest: str, text: str) -> Reference:
    host, sep, name = rest.partition("/")
    if not sep or not _HOST.match(host):
        raise ReferenceError(
            f"image {text!r}: name the registry host explicitly, as in "
            f"{transport}://registry.example.org:5000/team/app:1.0 (there is no default registry)"
        )
    digest = ""
    if "@" in name:
        name, _, digest = name.partition("@")
        if not _DIGEST.match(digest):
            raise ReferenceError(f"image {text!r}: digest {digest!r} must be sha256:<64 hex>")
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _TAG.match(tag):
            raise ReferenceError(f"image {text!r}: tag {tag!r} is not a valid tag")
    if not _REPO.match(name):
        raise ReferenceError(
            f"image {text!r}: repository {name!r} must be lower-case path components"
        )
    if not tag and not digest:
        tag = "latest"
    return Reference(transport, registry=host, repository=name, tag=tag, digest=digest)
