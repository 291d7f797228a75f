"""Apply an image's layers and stream the merged tree, as one tar, to the SquashFS builder:
nothing is unpacked to disk, and each layer is read (and decompressed) once.

The layers are read from the top one down. An entry of a layer is written unless a higher layer
already decided its path: wrote the same path, wrote a non-directory above it, whited it out
(`.wh.NAME`) or made a directory above it opaque (`.wh..wh..opq`). So every path is written
exactly once, with the content the top-most layer gives it, which is what applying the layers
bottom-up would leave. Hard links may point down to a file of a lower layer, still to come:
tar2sqfs accepts a link before its target. A link whose target a higher layer replaced keeps
the old content, as on a real file system: that older file is written under the link's name
when its layer comes (and if it came earlier in the link's own layer, that layer is read once
more at the end, for that file only).

Every member name is checked here, never trusted to tarfile (which only parses): names that
climb out of the root, hard links to anything but a file, relative symlinks that climb out,
device nodes, and paths through a symlink or a file are refused with the layer and the path
named. Python's tarfile is used to parse and to write, never to extract.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import queue
import re
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, cast

from nomad_driver.util.errors import PyhpcError

WHITEOUT = ".wh."
READ_MAX = 1 << 20  # the largest read of a layer stream: a member's data chunk, or a header
NAME_MAX = 4096  # PATH_MAX: a longer name or link target is refused
OPAQUE = ".wh..wh..opq"
ROOT = ""


def _unreadable() -> tuple[type[BaseException], ...]:
    """What reading a damaged layer raises, whichever decoder reads it."""
    errors: tuple[type[BaseException], ...] = (
        tarfile.TarError,
        EOFError,
        OSError,
        RecursionError,  # tarfile follows a chain of headers by recursion
        zlib.error,
    )
    try:
        from isal.isal_zlib import error as isal_error
    except ImportError:
        return errors
    return (*errors, cast("type[BaseException]", isal_error))


class LayerError(PyhpcError, ValueError):
    """A layer is malformed or hostile; the message names the layer and the path."""


@dataclass(frozen=True)
class Layer:
    """One layer blob. open() returns its raw (gzip, zstd or plain tar) bytes from the start."""

    label: str  # "layer 2 sha256:abc…", for messages
    open: Callable[[], IO[bytes]]
    digest: str = ""  # sha256:… of the raw bytes, checked as they are read ("" = checked already)
    diff_id: str = ""  # sha256:… of the uncompressed tar, checked when given
    size: int = 0  # expected size of the raw bytes, when known (for clearer messages)


Meter = Callable[[str, int, int], None]  # (layer label, bytes read so far, expected total)


class _Hashing(io.RawIOBase):
    """Reads raw through, hashing what passes. With behind=True the hashing happens in a
    thread of its own (hashlib lets go of the GIL for large buffers), off the reader's path;
    at most a few chunks wait for it."""

    def __init__(
        self, raw: IO[bytes], meter: Callable[[int], None] | None = None, behind: bool = False
    ) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.meter = meter
        self.pending: queue.Queue[bytes | None] | None = None
        self.hasher: threading.Thread | None = None
        if behind:
            self.pending = queue.Queue(8)
            self.hasher = threading.Thread(target=self._hash, name="layer-hash", daemon=True)
            self.hasher.start()

    def _hash(self) -> None:
        assert self.pending is not None
        while (data := self.pending.get()) is not None:
            self.sha.update(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if self.pending is not None:
            self.pending.put(bytes(data))
        else:
            self.sha.update(data)
        self.size += n
        if self.meter is not None:
            self.meter(self.size)
        return n

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        self.stop()
        return "sha256:" + self.sha.hexdigest()

    def stop(self) -> None:
        """Wait for the hashing thread (if any) to finish what it was given."""
        if self.hasher is not None and self.pending is not None:
            self.pending.put(None)
            self.hasher.join()
            self.hasher = None


class _Forward:
    """A stream that tarfile may treat as a file: tell() counts, seek() only goes forward (by
    reading), so tarfile's seekable mode reads member data straight from the stream, without
    the copies and 10 KB steps of its stream mode."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.pos = 0
        self.block = b""  # the last header-sized read: where tarfile stopped, at the end
        self.pending = b""  # given back by unread(), read again first

    def read(self, size: int = -1) -> bytes:
        # Member data comes in reads of at most 1 MiB; only a header (PAX, GNU long name) asks
        # for more at once, and tarfile would hold all of it in memory.
        if size < 0 or size > READ_MAX:
            raise tarfile.ReadError(f"a tar header of {size} bytes (at most {READ_MAX} allowed)")
        if self.pending:
            data, self.pending = self.pending[:size], self.pending[size:]
            data += self.stream.read(size - len(data)) if len(data) < size else b""
        else:
            data = self.stream.read(size)
        self.pos += len(data)
        if size == tarfile.BLOCKSIZE:
            self.block = data
        return data

    def unread(self, data: bytes) -> None:
        """Give back what the last read returned (a header checked before tarfile parses it)."""
        self.pending = data + self.pending
        self.pos -= len(data)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.pos:
            raise OSError(f"cannot seek back in a layer stream (to {pos} from {self.pos})")
        while pos > self.pos:
            if not self.read(min(pos - self.pos, 1 << 20)):
                break
        return self.pos


class _Checked(tarfile.TarInfo):
    """tarfile's member headers, checked before tarfile parses them: a PAX header must be
    well-formed records (Python 3.11's parser backtracks for hours on a header of digits) with
    no long run of digits; global PAX headers may not add up past 1 MiB (tarfile keeps them for
    the rest of the layer); and a member has at most one extended header of each kind, never
    PAX with a GNU long name or link: tar readers differ on which wins (tarfile takes the
    first PAX path, others the last, or the GNU name), so another reader, or a reviewer, would
    see another tree, a whiteout there or not."""

    def _proc_pax(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        forward = cast(_Forward, archive.fileobj)
        data = forward.read(self._block(self.size))  # type: ignore[attr-defined]
        forward.unread(data)
        _pax_ok(data[: self.size])
        if self.type == tarfile.XGLTYPE:
            held = sum(len(k) + len(v) for k, v in archive.pax_headers.items())
            if held + self.size > READ_MAX:
                raise tarfile.ReadError(f"global PAX headers of over {READ_MAX} bytes")
        else:
            _extended(archive, "PAX")
        return super()._proc_pax(archive)  # type: ignore[misc, no-any-return]

    def _proc_gnulong(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        _extended(archive, "GNU long name" if self.type == tarfile.GNUTYPE_LONGNAME else "link")
        return super()._proc_gnulong(archive)  # type: ignore[misc, no-any-return]


def _extended(archive: tarfile.TarFile, kind: str) -> None:
    seen: set[str] = archive.__dict__.setdefault("pyhpc_extended", set())
    if kind in seen or (kind == "PAX" and seen) or "PAX" in seen:
        raise tarfile.ReadError(
            f"a member with a {kind} header after {' and '.join(sorted(seen))} headers "
            "(tar readers disagree on which wins)"
        )
    seen.add(kind)


def _pax_ok(data: bytes) -> None:
    """PAX records ("LENGTH KEY=VALUE\n", LENGTH counting the whole record), read in one
    linear pass; and no run of more than 64 digits anywhere."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 8)
        if space <= pos or not data[pos:space].isdigit():
            raise tarfile.ReadError(f"a malformed PAX header (at byte {pos})")
        end = pos + int(data[pos:space])
        if end <= space + 2 or end > len(data) or data[end - 1] != 0x0A:
            raise tarfile.ReadError(f"a malformed PAX record (at byte {pos})")
        if data.find(b"=", space + 2, end) < 0:
            raise tarfile.ReadError(f"a PAX record without a value (at byte {pos})")
        pos = end
    if re.search(rb"[0-9]{65}", data):
        raise tarfile.ReadError("a PAX header with a run of more than 64 digits")


class _Counting:
    """A write-only stream with tell(), for tarfile's plain (not stream) writing mode."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.pos = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    """The decompressed stream of raw (gzip, zstd or plain). gzip is read with ISA-L's
    decoder in a thread of its own when python-isal is installed (reading raw there too, so a
    digest of it is taken off the caller's path), else with zlib."""
    buffered = io.BufferedReader(raw, 1 << 20)  # type: ignore[type-var]
    magic = buffered.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        try:
            from isal import igzip_threaded
        except ImportError:
            import gzip

            return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
        return igzip_threaded.open(buffered, "rb", threads=1)  # type: ignore[no-untyped-call,no-any-return]
    if magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buffered)
    return buffered


def _members(
    layer: Layer, meter: Meter | None = None
) -> Iterator[tuple[int, tarfile.TarInfo, tarfile.TarFile]]:
    """(index, member, archive) of every member, verifying the digests at the end."""
    raw = layer.open()
    stream: IO[bytes] | None = None
    inner: _Hashing | None = None
    try:
        counted = None if meter is None else (lambda n: meter(layer.label, n, layer.size))
        outer = _Hashing(raw, counted) if layer.digest else None
        stream = _decompressed(outer if outer else raw)  # type: ignore[arg-type]
        inner = _Hashing(stream, behind=True) if layer.diff_id else None
        # Read in large chunks, one Python call below each.
        source = io.BufferedReader(inner, 1 << 20) if inner else stream
        unreadable: tuple[type[BaseException], ...] = (ValueError, *_unreadable())
        forward = _Forward(source)
        try:
            archive = tarfile.open(fileobj=cast(IO[bytes], forward), mode="r:", tarinfo=_Checked)
            for index, member in enumerate(archive):
                archive.__dict__.pop("pyhpc_extended", None)  # counted again for the next
                yield index, member, archive
                # tarfile would keep every member, and its headers, to the end
                archive.members.clear()  # type: ignore[attr-defined]
            if any(forward.block):  # tarfile ends quietly at a header it cannot parse
                raise LayerError(
                    f"{layer.label}: not a tar header at byte {forward.pos - len(forward.block)}"
                    " (a tar reader that skips it would see other content)"
                )
        except LayerError:
            raise
        except unreadable as err:
            short = ""
            if outer is not None and layer.size and outer.size < layer.size:
                short = f"; truncated: {outer.size} of {layer.size} bytes arrived"
            raise LayerError(f"{layer.label}: not a readable tar stream ({err}{short})") from err
        # Whatever follows the tar's end still counts toward both digests; the blob's own
        # digest is named first, as the plainer of the two.
        uncompressed = inner.drain() if inner is not None else ""
        if outer is not None:
            stream.read()
            got = outer.drain()
            if got != layer.digest:
                raise LayerError(
                    f"{layer.label}: digest mismatch: expected {layer.digest}, got {got}"
                )
        if inner is not None and uncompressed != layer.diff_id:
            raise LayerError(f"{layer.label}: uncompressed content does not match {layer.diff_id}")
    finally:
        if inner is not None:
            inner.stop()
        if stream is not None:
            stream.close()  # ends the decoder's thread, if any
        raw.close()


def _clean(name: str, layer: Layer) -> str:
    _name_ok(name, layer)
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise LayerError(f"{layer.label}: {name!r} climbs out of the image root")
        parts.append(part)
    return "/".join(parts)


def _name_ok(name: str, layer: Layer) -> None:
    """A name or link target the kernel could hold: no NUL (where a tar reader in C would cut
    it short, and see another name than this merge did), at most PATH_MAX long."""
    if "\0" in name:
        raise LayerError(f"{layer.label}: {name!r} holds a NUL byte")
    if len(name) > NAME_MAX:
        raise LayerError(f"{layer.label}: a name of {len(name)} characters ({name[:60]!r}...)")


def _numbers_ok(member: tarfile.TarInfo, layer: Layer) -> None:
    """Owner ids and time as the SquashFS can hold them; no sparse member (whose holes a
    header of a few bytes can make petabytes long)."""
    if member.issparse():
        raise LayerError(f"{layer.label}: {member.name!r} is a sparse file, not supported")
    for what, value in (("uid", member.uid), ("gid", member.gid)):
        if not isinstance(value, int) or not 0 <= value < 1 << 32:
            raise LayerError(f"{layer.label}: {member.name!r} has {what} {value!r}")
    mtime = member.mtime
    if not isinstance(mtime, (int, float)) or not math.isfinite(mtime) or abs(mtime) >= 1 << 62:
        raise LayerError(f"{layer.label}: {member.name!r} has modification time {mtime!r}")


def _ancestors(path: str) -> Iterator[str]:
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path
    if path:
        yield ROOT


@dataclass
class _Link:
    name: str  # the link's final path
    target: str
    layer: int  # where the link was


@dataclass
class _Merger:
    layers: list[Layer]
    archive: tarfile.TarFile
    written: dict[str, str] = field(default_factory=dict)  # path -> kind, as written
    implied: set[str] = field(default_factory=set)  # directories above written paths
    gone: set[str] = field(default_factory=set)  # whited out by a higher layer
    opaque: set[str] = field(default_factory=set)  # opaque in a higher layer
    # target path -> links (from higher layers or earlier in the layer) still waiting for it
    waiting: dict[str, list[_Link]] = field(default_factory=dict)
    refetch: dict[int, dict[str, list[_Link]]] = field(default_factory=dict)
    count: int = 0
    meter: Meter | None = None

    def decided(self, path: str) -> str:
        """Why a higher layer hides path ("" if it does not)."""
        if path in self.written or path in self.gone:
            return "written above"
        for parent in _ancestors(path):
            if parent in self.gone:
                return "whited out above"
            if parent in self.opaque:
                return "under an opaque directory above"
            kind = self.written.get(parent)
            if kind is not None and kind != "dir":
                return f"under a {kind} above"
        return ""

    def write(self, member: tarfile.TarInfo, name: str, source: tarfile.TarFile | None) -> None:
        info = _copy(member, name or ".")
        if member.isreg() and source is not None:
            self.archive.addfile(info, source.extractfile(member))
        else:
            self.archive.addfile(info)
        self.count += 1

    def link(self, name: str, target: str, member: tarfile.TarInfo) -> None:
        info = _copy(member, name)
        info.type, info.linkname, info.size = tarfile.LNKTYPE, target, 0
        self.archive.addfile(info)
        self.count += 1

    def record(self, path: str, kind: str, layer: Layer, name: str) -> None:
        if kind != "dir" and path in self.implied:
            raise LayerError(
                f"{layer.label}: {name!r} is a {kind}, but a higher layer put files under it"
            )
        self.written[path] = kind
        for parent in _ancestors(path):
            if parent in self.implied:
                break
            self.implied.add(parent)

    def resolve(
        self, path: str, member: tarfile.TarInfo, source: tarfile.TarFile, visible: bool
    ) -> str:
        """This layer's file at path is the content some waiting links need. Returns the name
        that holds this content in the image ("" if none does)."""
        links = self.waiting.pop(path, [])
        if not links:
            return path if visible else ""
        if not member.isreg():
            raise LayerError(
                f"{self.layers[links[0].layer].label}: hard link {links[0].name!r} -> "
                f"{path!r}: not a regular file"
            )
        first = path if visible else links[0].name
        if not visible:
            self.write(member, first, source)  # the old content, kept under the link's name
            links = links[1:]
        for link in links:
            self.link(link.name, first, member)
        return first

    def layer(self, index: int) -> None:
        layer = self.layers[index]
        whiteouts: list[str] = []
        opaques: list[str] = []
        here: dict[str, str] = {}  # this layer's entries so far: path -> kind
        held: dict[str, str] = {}  # this layer's files -> the name holding their content
        for _, member, source in _members(layer, self.meter):
            path = _clean(member.name, layer)
            base = posixpath.basename(path)
            if base.startswith(WHITEOUT):
                directory = posixpath.dirname(path)
                if base == OPAQUE:
                    opaques.append(directory)
                else:
                    target = base[len(WHITEOUT) :]
                    if not target or target in (".", ".."):
                        raise LayerError(f"{layer.label}: whiteout {member.name!r} names nothing")
                    whiteouts.append(posixpath.join(directory, target))
                continue
            _numbers_ok(member, layer)
            kind = _kind(member, path, layer)
            for parent in _ancestors(path):  # a layer may not write through its own non-dirs
                if here.get(parent, "dir") not in ("dir",):
                    raise LayerError(
                        f"{layer.label}: {member.name!r} goes through /{parent}, a {here[parent]}"
                    )
            if path in here and (here[path] != "dir" or kind != "dir"):
                raise LayerError(
                    f"{layer.label}: {member.name!r} appears twice (tar readers disagree on "
                    "which copy wins)"
                )
            here[path] = "file" if kind == "hardlink" else kind
            hidden = self.decided(path)
            if kind == "hardlink":
                self.hardlink(index, member, path, bool(hidden), here, held)
                continue
            if kind == "file":
                held[path] = self.resolve(path, member, source, visible=not hidden)
            if hidden:
                continue
            if path == ROOT and kind != "dir":
                raise LayerError(f"{layer.label}: the image root must be a directory")
            self.record(path, kind, layer, member.name)
            self.write(member, path, source)
        self.gone.update(whiteouts)
        self.opaque.update(opaques)

    def hardlink(
        self,
        index: int,
        member: tarfile.TarInfo,
        path: str,
        hidden: bool,
        here: dict[str, str],
        held: dict[str, str],
    ) -> None:
        """A hard link of layer INDEX (at PATH; HIDDEN by a layer above): linked to the name
        holding its target's content, or left waiting for it (later in this layer, or below),
        or, where this layer replaced its target, fetched by reading the layer again."""
        layer = self.layers[index]
        target = _clean(member.linkname, layer)
        if target == path:
            raise LayerError(f"{layer.label}: hard link {member.name!r} points to itself")
        if target in here and here[target] != "file":
            raise LayerError(
                f"{layer.label}: hard link {member.name!r} -> {member.linkname!r}: "
                "not a regular file"
            )
        # Links (from above) to this link's name want its target's content too.
        group = self.waiting.pop(path, [])
        if not hidden:
            self.record(path, "file", layer, member.name)
            group.insert(0, _Link(path, target, index))
        if not group:
            return
        if held.get(target):
            for link in group:
                self.link(link.name, held[target], member)
            held[path] = held[target]
        elif here.get(target) == "file":  # replaced above: read this layer again
            self.refetch.setdefault(index, {}).setdefault(target, []).extend(group)
        else:
            self.waiting.setdefault(target, []).extend(group)

    def refetched(self) -> None:
        """Re-read the layers whose replaced files are still wanted by their own links."""
        for index, wanted in self.refetch.items():
            for _, member, source in _members(self.layers[index]):
                path = _clean(member.name, self.layers[index])
                links = wanted.pop(path, None)
                if links and member.isreg():
                    self.write(member, links[0].name, source)
                    for link in links[1:]:
                        self.link(link.name, links[0].name, member)
                # Read on to the end even once nothing is wanted: the digests are checked
                # there, and these bytes were fetched again.
            if wanted:
                target, links = next(iter(wanted.items()))
                raise LayerError(
                    f"{self.layers[index].label}: hard link {links[0].name!r} -> {target!r}: "
                    "no such file in its layer"
                )


def _kind(member: tarfile.TarInfo, path: str, layer: Layer) -> str:
    if member.isdir():
        return "dir"
    if member.isreg():
        return "file"
    if member.islnk():
        return "hardlink"
    if member.issym():
        if not member.linkname:
            raise LayerError(f"{layer.label}: symlink {member.name!r} has no target")
        _name_ok(member.linkname, layer)
        if not member.linkname.startswith("/"):
            depth = len(posixpath.dirname(path).split("/")) if "/" in path else 0
            target = posixpath.normpath(posixpath.join("x/" * depth, member.linkname))
            if target == ".." or target.startswith("../"):
                raise LayerError(
                    f"{layer.label}: symlink {member.name!r} -> {member.linkname!r} points out "
                    "of the image"
                )
        return "symlink"
    if member.isfifo():
        return "fifo"
    if member.ischr() or member.isblk():
        raise LayerError(f"{layer.label}: device node {member.name!r} is not allowed in images")
    raise LayerError(f"{layer.label}: {member.name!r} has an unsupported tar type {member.type!r}")


def merge(
    layers: list[Layer],
    out: IO[bytes],
    progress: Callable[[str], None] | None = None,
    meter: Meter | None = None,
) -> int:
    """Write the merged tree of layers (bottom layer first in the list) to out as one tar
    stream; returns the entries written."""
    counting = _Counting(out)
    with tarfile.open(
        fileobj=cast(IO[bytes], counting), mode="w", format=tarfile.PAX_FORMAT
    ) as archive:
        archive.copybufsize = 1 << 20  # type: ignore[attr-defined]  # (not in typeshed)
        merger = _Merger(layers, archive, meter=meter)
        # What tarfile raises writing numbers it cannot, or reading what it cannot parse.
        bad_numbers: tuple[type[BaseException], ...] = (ValueError, OverflowError, *_unreadable())
        for index in reversed(range(len(layers))):
            if progress:
                progress(f"applying {layers[index].label}")
            try:
                merger.layer(index)
            except (BrokenPipeError, LayerError):
                raise  # the builder stopped (its own message says why), or said already
            except bad_numbers as err:
                raise LayerError(f"{layers[index].label}: unreadable data ({err})") from err
        merger.refetched()
        if merger.waiting:
            target, links = next(iter(merger.waiting.items()))
            raise LayerError(
                f"{layers[links[0].layer].label}: hard link {links[0].name!r} -> {target!r}: "
                "no such file earlier in the image"
            )
    return merger.count


def _copy(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE if member.islnk() else member.type
    if info.type == tarfile.AREGTYPE or info.type == tarfile.CONTTYPE:
        info.type = tarfile.REGTYPE
    info.mode, info.uid, info.gid = member.mode & 0o7777, member.uid, member.gid
    info.mtime, info.size, info.linkname = member.mtime, member.size, member.linkname
    info.uname, info.gname = "", ""
    info.pax_headers = {k: v for k, v in member.pax_headers.items() if _xattr_kept(k)}
    return info


def _xattr_kept(key: str) -> bool:
    """The extended attributes an image may carry: user.* and file capabilities (which count
    only inside the task's user namespace, and not at all under no_new_privs). Never trusted.*
    (overlayfs reads its own opaque and redirect marks there) nor other security.* labels, nor
    a name with control characters."""
    if not key.startswith("SCHILY.xattr."):
        return False
    name = key[len("SCHILY.xattr.") :]
    if not name.isprintable() or " " in name:
        return False
    return name.startswith("user.") or name == "security.capability"
