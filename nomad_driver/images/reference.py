"""Image references, as users write them in `pyhpc image import` and a task's `image`.

    docker://HOST[:PORT]/REPO[:TAG][@sha256:HEX]   an OCI distribution registry
    oras://HOST[:PORT]/REPO[:TAG][@sha256:HEX]     a SquashFS pushed as an OCI artifact
    oci:DIR[:REF]                                 an OCI image layout directory (skopeo's syntax)
    oci-archive:FILE[:REF]                        the same, as a tar file
    docker-archive:FILE                           the output of `docker save`
    dir:ROOTFS                                    a root file system directory
    /PATH.sqsh                                    a SquashFS file

The registry host is always written out: there is no default registry. Local paths are
normalised here and may not climb with '..', so what an allowlist compares (`admits`) is the
place that will be read.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from nomad_driver.util.errors import InvalidArgument

TRANSPORTS = ("docker", "oras", "oci", "oci-archive", "docker-archive", "dir", "file")
LOCAL = ("oci", "oci-archive", "docker-archive", "dir")
_REPO = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:localhost|[A-Za-z0-9.-]+\.[A-Za-z0-9-]+|\[[0-9a-fA-F:]+\]|[0-9.]+)(?::[0-9]{1,5})?$"
)


class ReferenceError(InvalidArgument, ValueError):
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
    return Reference(transport, path=_local_path(path, f"image {text!r}: {transport}:"), tag=tag)


def _local_path(path: str, where: str) -> str:
    """path with '.', '//' and a trailing '/' gone; ReferenceError if it is relative or has a
    '..' component (refused, not resolved: the admin's allowlist compares this text)."""
    if not path.startswith("/"):
        raise ReferenceError(f"{where} needs an absolute path")
    if ".." in path.split("/"):
        raise ReferenceError(f"{where} {path!r}: a '..' component is not accepted")
    return "/" + posixpath.normpath(path).lstrip("/") if path.strip("/") else "/"


def _parse_remote(transport: str, rest: str, text: str) -> Reference:
    host, sep, name = rest.partition("/")
    host = host.lower()  # DNS names know no case: one spelling for the store and every rule
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
    if host in ("docker.io", "index.docker.io") and "/" not in name:
        name = f"library/{name}"  # Docker Hub's official images, as Docker names them
    return Reference(transport, registry=host, repository=name, tag=tag, digest=digest)


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def _under(components: list[str], prefix: str) -> bool:
    """components start with prefix's; strictly beneath it when prefix ends in '/'."""
    wanted = _components(prefix)
    beneath = prefix.endswith("/") and bool(wanted)
    return components[: len(wanted)] == wanted and len(components) > len(wanted) * beneath


def admits(entry: str, ref: Reference) -> bool:
    """Whether one image_sources entry allows ref. Entries are prefixes of references compared
    on whole components of the parsed, normalised forms, never as raw text:
    "docker://reg:5000/hpc/" admits docker://reg:5000/hpc/app:1 but not .../hpcx/app or
    another host; "dir:/srv/rootfs/" admits dir:/srv/rootfs/a but not dir:/srv/rootfs2 or
    anything that climbs out with '..' (refused by parse). A trailing '/' means strictly
    beneath (as a text prefix did); without it the entry admits itself too. A registry entry
    that names a tag or digest admits that one image only. A malformed entry admits nothing."""
    transport, sep, rest = entry.strip().partition(":")
    if not sep or transport != ref.transport:
        return False
    if ref.remote:
        if not rest.startswith("//"):
            return False
        host, _, name = rest[2:].partition("/")
        if host and host.lower() != ref.registry.lower():
            return False
        if not host and name:
            return False  # "docker:///hpc/" names no registry: nothing
        if ":" in name.rsplit("/", 1)[-1] or "@" in name:
            try:
                wanted = parse(entry.strip())
            except ReferenceError:
                return False
            if wanted.digest:
                return (wanted.repository, wanted.digest) == (ref.repository, ref.digest)
            return (wanted.repository, wanted.tag) == (ref.repository, ref.tag)
        return _under(_components(ref.repository), name)
    if ref.transport not in LOCAL:
        return False
    try:
        directory = entry_directory(entry.strip())
    except ReferenceError:
        return False
    return _under(_components(ref.path), directory + ("/" if rest.endswith("/") else ""))


def allowed_by(ref: Reference, entries: Iterable[str]) -> str | None:
    """The first image_sources entry that admits ref, else None."""
    return next((entry for entry in entries if admits(entry, ref)), None)


def entry_directory(entry: str) -> str:
    """The normalised path a local image_sources entry names ("dir:/srv/rootfs/" ->
    "/srv/rootfs"): what an import from it opens its source beneath."""
    return _local_path(entry.partition(":")[2] or "/", f"image_sources entry {entry!r}:")
