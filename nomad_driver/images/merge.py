"""Apply an image's layers in order and stream the merged tree, as one tar, to the SquashFS
builder: nothing is unpacked to disk.

Whiteouts mean a layer cannot be written out before the layers above it are known, so there are
two passes over the (already downloaded) layer blobs. The first reads only the tar headers and
builds the final tree: which member of which layer each path comes from, hard links grouped by
the file they share. The second reads the layers again and writes each surviving member once,
under its final name(s).

Every member name is checked here, never trusted to tarfile (which only parses): names that
climb out of the root, hard links to anything but a file already in the tree, relative symlinks
that climb out, device nodes, and paths through a symlink or a file are refused with the layer
and the path named. Python's tarfile is used to parse and to write, never to extract.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ROOT = ""


class LayerError(ValueError):
    """A layer is malformed or hostile; the message names the layer and the path."""


@dataclass(frozen=True)
class Layer:
    """One layer blob. open() returns its raw (gzip, zstd or plain tar) bytes from the start."""

    label: str  # "layer 2 sha256:abc…", for messages
    open: Callable[[], IO[bytes]]
    digest: str = ""  # sha256:… of the raw bytes, checked in the first pass ("" = checked already)
    diff_id: str = ""  # sha256:… of the uncompressed tar, checked in the first pass when given


@dataclass
class _Node:
    kind: str  # "dir", "file", "symlink", "fifo"
    key: tuple[int, int] | None  # (layer, member) it comes from; None: implied directory
    children: set[str] = field(default_factory=set)


class _Hashing(io.RawIOBase):
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        self.size += n
        return n

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return "sha256:" + self.sha.hexdigest()


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    buffered = io.BufferedReader(raw, 1 << 20)  # type: ignore[type-var]
    magic = buffered.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buffered)
    return buffered


def _members(layer: Layer) -> Iterator[tuple[int, tarfile.TarInfo, tarfile.TarFile]]:
    """(index, member, archive) of every member, verifying the digests at the end."""
    raw = layer.open()
    try:
        outer = _Hashing(raw) if layer.digest else None
        stream = _decompressed(outer if outer else raw)  # type: ignore[arg-type]
        inner = _Hashing(stream) if layer.diff_id else None
        try:
            archive = tarfile.open(fileobj=inner or stream, mode="r|")
            for index, member in enumerate(archive):
                yield index, member, archive
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            raise LayerError(f"{layer.label}: not a readable tar stream ({err})") from err
        if inner is not None and inner.drain() != layer.diff_id:
            raise LayerError(f"{layer.label}: uncompressed content does not match {layer.diff_id}")
        if outer is not None:
            stream.read()  # whatever follows the tar's end still counts toward the digest
            got = outer.drain()
            if got != layer.digest:
                raise LayerError(
                    f"{layer.label}: digest mismatch: expected {layer.digest}, got {got}"
                )
    finally:
        raw.close()


def _clean(name: str, layer: Layer) -> str:
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise LayerError(f"{layer.label}: {name!r} climbs out of the image root")
        parts.append(part)
    return "/".join(parts)


class Tree:
    """The merged tree after the first pass."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {ROOT: _Node("dir", None)}

    def _remove(self, path: str, below: int | None = None) -> None:
        """Remove path and what is under it (only nodes from layers below `below`, if given)."""
        node = self.nodes.get(path)
        if node is None:
            return
        for child in list(node.children):
            self._remove(child, below)
        if below is not None and node.key is not None and node.key[0] >= below:
            return
        if below is not None and node.children:
            return  # a directory that still holds same-layer entries stays
        if path == ROOT:
            return
        del self.nodes[path]
        parent = self.nodes.get(posixpath.dirname(path))
        if parent is not None:
            parent.children.discard(path)

    def _parent(self, path: str, layer: Layer, name: str) -> None:
        """Make sure every ancestor is a directory, implying missing ones."""
        parent = posixpath.dirname(path)
        node = self.nodes.get(parent)
        if node is None:
            self._parent(parent, layer, name)
            node = self.nodes[parent] = _Node("dir", None)
            self.nodes[posixpath.dirname(parent)].children.add(parent)
        elif node.kind != "dir":
            raise LayerError(f"{layer.label}: {name!r} goes through /{parent}, a {node.kind}")
        node.children.add(path)

    def apply(self, index: int, layer: Layer, member: tarfile.TarInfo, position: int) -> None:
        path = _clean(member.name, layer)
        base = posixpath.basename(path)
        if base.startswith(WHITEOUT):
            directory = posixpath.dirname(path)
            existing = self.nodes.get(directory)
            if existing is not None and existing.kind != "dir":
                raise LayerError(
                    f"{layer.label}: whiteout {member.name!r} is inside a {existing.kind}"
                )
            if base == OPAQUE:
                for child in list(existing.children if existing else ()):
                    self._remove(child, below=index)
            else:
                target = base[len(WHITEOUT) :]
                if not target or target in (".", ".."):
                    raise LayerError(f"{layer.label}: whiteout {member.name!r} names nothing")
                self._remove(posixpath.join(directory, target))
            return
        key = (index, position)
        if member.isdir():
            kind = "dir"
        elif member.isreg():
            kind = "file"
        elif member.issym():
            kind = "symlink"
            if not member.linkname:
                raise LayerError(f"{layer.label}: symlink {member.name!r} has no target")
            if not member.linkname.startswith("/"):
                depth = len(posixpath.dirname(path).split("/")) if "/" in path else 0
                target = posixpath.normpath(posixpath.join("x/" * depth, member.linkname))
                if target == ".." or target.startswith("../"):
                    raise LayerError(
                        f"{layer.label}: symlink {member.name!r} -> {member.linkname!r} points "
                        "out of the image"
                    )
        elif member.islnk():
            kind = "file"
            linked = self.nodes.get(_clean(member.linkname, layer))
            if linked is None or linked.kind != "file" or linked.key is None:
                raise LayerError(
                    f"{layer.label}: hard link {member.name!r} -> {member.linkname!r}: no such "
                    "file earlier in the image"
                )
            key = linked.key
        elif member.isfifo():
            kind = "fifo"
        elif member.ischr() or member.isblk():
            raise LayerError(f"{layer.label}: device node {member.name!r} is not allowed in images")
        else:
            raise LayerError(
                f"{layer.label}: {member.name!r} has an unsupported tar type {member.type!r}"
            )
        if path == ROOT:
            if kind != "dir":
                raise LayerError(f"{layer.label}: the image root must be a directory")
            self.nodes[ROOT].key = key
            return
        existing = self.nodes.get(path)
        if existing is not None:
            if existing.kind == "dir" and kind == "dir":
                existing.key = key  # new attributes, same children
                return
            self._remove(path)
        self._parent(path, layer, member.name)
        self.nodes[path] = _Node(kind, key)

    def plan(self) -> dict[tuple[int, int], list[str]]:
        """(layer, member) -> the final paths it is written under, in a stable order."""
        out: dict[tuple[int, int], list[str]] = {}
        for path, node in self.nodes.items():
            if node.key is not None:
                out.setdefault(node.key, []).append(path)
        for paths in out.values():
            paths.sort()
        return out


def merge(
    layers: list[Layer], out: IO[bytes], progress: Callable[[str], None] | None = None
) -> int:
    """Write the merged tree of layers to out as one tar stream; returns the entries written."""
    tree = Tree()
    for index, layer in enumerate(layers):
        if progress:
            progress(f"reading {layer.label}")
        for position, member, _ in _members(layer):
            tree.apply(index, layer, member, position)
    plan = tree.plan()
    written = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for index, layer in enumerate(layers):
            if progress:
                progress(f"writing {layer.label}")
            for position, member, source in _members(layer):
                paths = plan.get((index, position))
                if not paths:
                    continue
                first = paths[0]
                info = _copy(member, first or ".")
                if member.islnk():
                    # The data of a hard-linked file is written at its own member; this name
                    # only links to it (never to a shadowed original: paths[0] is in the tree).
                    continue
                if member.isreg():
                    archive.addfile(info, source.extractfile(member))
                else:
                    archive.addfile(info)
                written += 1
                for extra in paths[1:]:
                    link = _copy(member, extra)
                    link.type, link.linkname, link.size = tarfile.LNKTYPE, first, 0
                    archive.addfile(link)
                    written += 1
    return written


def _copy(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE if member.islnk() else member.type
    if info.type == tarfile.AREGTYPE or info.type == tarfile.CONTTYPE:
        info.type = tarfile.REGTYPE
    info.mode, info.uid, info.gid = member.mode & 0o7777, member.uid, member.gid
    info.mtime, info.size, info.linkname = member.mtime, member.size, member.linkname
    info.uname, info.gname = "", ""
    info.pax_headers = {
        k: v for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")
    }
    return info
