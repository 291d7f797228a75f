"""Where images come from: each transport yields the manifest, the config and the layer blobs
(or a finished SquashFS, or a tree to pack), with every digest checked against what referenced it.

Local sources are read by root on a tenant's behalf, so they are read by descriptor: opened
beneath the directory the admin allowed with no symlink on the way (openat2), and a dir: tree
walked entry by entry without ever following a symlink, so nothing swapped in while the import
runs can make root read a file the source does not contain.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import posixpath
import stat
import tarfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from nomad_driver.images.credentials import Keychain
from nomad_driver.images.merge import Layer
from nomad_driver.images.reference import Reference
from nomad_driver.images.registry import (
    INDEX_TYPES,
    Registry,
    RegistryError,
    is_digest,
    select_platform,
)
from nomad_driver.runtime import linux
from nomad_driver.util.errors import PyhpcError

SQUASHFS_ARTIFACT = "application/vnd.pyhpc.squashfs.v1"
SQUASHFS_CONFIG = "application/vnd.pyhpc.image.config.v1+json"
SIGNATURE_ARTIFACT = "application/vnd.dsse.envelope.v1+json"
ARTIFACT_TYPE = "application/vnd.pyhpc.squashfs.image.v1"
Progress = Callable[[str], None]


class SourceError(PyhpcError, RuntimeError):
    """The source is missing, malformed or does not match its digests."""


@dataclass
class Fetched:
    """An image ready to become a SquashFS: layers to merge, or a SquashFS file, or a tree."""

    config: dict[str, Any] = field(default_factory=dict)  # the OCI image config
    manifest_digest: str = ""
    config_digest: str = ""
    layers: list[Layer] = field(default_factory=list)
    squashfs: str = ""  # a finished image (file:, oras://)
    directory: str = ""  # dir: the source, as named
    tree: Callable[[IO[bytes]], object] | None = None  # dir: writes it as one tar stream
    signature: str = ""  # a DSSE envelope that came with the image (oras://)
    private: bool = False  # the registry asked for a login, and took one
    provenance: dict[str, Any] = field(default_factory=dict)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as err:
        raise SourceError(f"{what} is not JSON ({err})") from err
    if not isinstance(value, dict):
        raise SourceError(f"{what} is not a JSON object")
    return value


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _verified(data: bytes, digest: str, what: str) -> bytes:
    if _digest_of(data) != digest:
        raise SourceError(f"{what} does not match its digest {digest}")
    return data


def _blob_name(digest: str) -> str:
    if not is_digest(digest):
        raise SourceError(f"unsupported or malformed digest {digest!r} (sha256:<64 hex> only)")
    return f"blobs/sha256/{digest[7:]}"


@dataclass(frozen=True)
class LocalAccess:
    """How a local source may be read. beneath: the directory the admin allowed it from
    (image_sources); the source is opened beneath it with no symlink on the way. Empty: the
    path as given (root importing by hand). public_only: refuse any file not readable by every
    user and any directory not searchable and listable by every user, since a task of any user
    may start from the image (root by hand may take anything)."""

    beneath: str = ""
    public_only: bool = False


PUBLIC_RULE = (
    "an image source for tasks must be readable by every user (files o+r, directories o+rx); "
    "make it so, or have root import it by hand with `pyhpc image import`"
)


def _public(st: os.stat_result, where: str, access: LocalAccess) -> None:
    if not access.public_only:
        return
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
    if st.st_mode & need != need:
        raise SourceError(f"{where} has mode {st.st_mode & 0o7777:04o}: {PUBLIC_RULE}")


def _openat(dirfd: int, rel: str, flags: int, where: str, access: LocalAccess) -> int:
    """rel opened beneath dirfd, one component at a time, no symlink followed, each directory
    on the way searchable by every user when access.public_only."""
    parts = [p for p in rel.split("/") if p not in ("", ".")] or ["."]
    current = dirfd
    try:
        for part in parts[:-1]:
            step = linux.openat2(current, part, os.O_PATH | os.O_DIRECTORY, linux.STRICT)
            if current != dirfd:
                os.close(current)
            current = step
            st = os.fstat(current)
            if access.public_only and not st.st_mode & stat.S_IXOTH:
                raise SourceError(
                    f"{where}: directory {part!r} has mode {st.st_mode & 0o7777:04o}: {PUBLIC_RULE}"
                )
        return linux.openat2(current, parts[-1], flags | os.O_NOCTTY, linux.STRICT)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SourceError(
                f"{where}: {rel!r} is or passes through a symlink, which an import never follows"
            ) from err
        if err.errno == errno.EXDEV:
            raise SourceError(f"{where}: {rel!r} leads out of {access.beneath}") from err
        raise SourceError(f"{where}: {rel}: {err.strerror}") from err
    finally:
        if current != dirfd:
            os.close(current)


def _open_local(ref: Reference, access: LocalAccess, directory: bool) -> int:
    """The source's file (directory=False: a regular file) or directory, opened as access
    allows, checked to be what it should be and readable as access requires."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else os.O_NONBLOCK)
    what = "directory" if directory else "file"
    if not access.beneath:
        try:
            fd = os.open(ref.path, flags | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as err:
            raise SourceError(f"{ref}: no such {what} ({err.strerror})") from err
    else:
        if ref.path == access.beneath:
            base, rel = posixpath.split(ref.path.rstrip("/") or "/")
        else:
            base, rel = access.beneath, posixpath.relpath(ref.path, access.beneath)
        if rel == ".." or rel.startswith("../"):
            raise SourceError(f"{ref}: not beneath {access.beneath}")
        try:
            top = os.open(base or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise SourceError(f"{ref}: {base}: {err.strerror}") from err
        try:
            fd = _openat(top, rel or ".", flags, str(ref), access)
        finally:
            os.close(top)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) != directory or not (directory or stat.S_ISREG(st.st_mode)):
            raise SourceError(f"{ref}: not a {what}")
        _public(st, str(ref), access)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _tar_file(ref: Reference, access: LocalAccess) -> tarfile.TarFile:
    f = os.fdopen(_open_local(ref, access, directory=False), "rb")
    try:
        return tarfile.open(fileobj=f)
    except (OSError, tarfile.TarError) as err:
        f.close()
        raise SourceError(f"{ref}: cannot read the archive ({err})") from err


class _Layout:
    """An OCI image layout, in a directory or a tar file: read(path) -> bytes, open(path)."""

    def __init__(self, ref: Reference, access: LocalAccess) -> None:
        self.ref, self.access = ref, access
        self.tar: tarfile.TarFile | None = None
        self.fd = -1
        if ref.transport == "oci-archive":
            self.tar = _tar_file(ref, access)
            self.members = {m.name.lstrip("./"): m for m in self.tar.getmembers() if m.isreg()}
        else:
            self.fd = _open_local(ref, access, directory=True)
            weakref.finalize(self, os.close, self.fd)  # layers are opened later, lazily

    def open(self, name: str) -> IO[bytes]:
        if self.tar is not None:
            member = self.members.get(name)
            stream = self.tar.extractfile(member) if member else None
            if stream is None:
                raise SourceError(f"{self.ref}: {name} is missing from the archive")
            return stream
        fd = _openat(self.fd, name, os.O_RDONLY | os.O_NONBLOCK, str(self.ref), self.access)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{self.ref}: {name} is not a regular file")
            _public(st, f"{self.ref}: {name}", self.access)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


def _opener(open_blob: Callable[[str], IO[bytes]], name: str) -> Callable[[], IO[bytes]]:
    return lambda: open_blob(name)


def _from_layout(ref: Reference, access: LocalAccess) -> Fetched:
    layout = _Layout(ref, access)
    index = _json(layout.read("index.json"), f"{ref}: index.json")
    manifests = index.get("manifests", [])
    chosen = [
        m
        for m in manifests
        if not ref.tag
        or m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref.tag
    ]
    if len(chosen) != 1:
        names = [
            m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in manifests
        ]
        want = f"tag {ref.tag!r}" if ref.tag else "one image (name a tag)"
        raise SourceError(f"{ref}: expected {want}; the index has {names}")
    descriptor = chosen[0]
    body = _verified(
        layout.read(_blob_name(descriptor["digest"])), descriptor["digest"], f"{ref}: manifest"
    )
    manifest = _json(body, f"{ref}: manifest")
    if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
        digest = select_platform(manifest, str(ref))
        body = _verified(layout.read(_blob_name(digest)), digest, f"{ref}: manifest")
        manifest, descriptor = _json(body, f"{ref}: manifest"), {"digest": digest}
    return _from_manifest(ref, manifest, descriptor["digest"], layout.read, layout.open)


def _diff_ids(ref: Reference, config: Any, layers: int) -> list[str]:
    """The config's rootfs.diff_ids, one sha256 digest per layer. The config names each
    layer's uncompressed content too, and the image's identity rests on both: each is checked
    as the layer is read."""
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != layers:
        count = len(diff_ids) if isinstance(diff_ids, list) else "no"
        raise SourceError(f"{ref}: {layers} layers but {count} rootfs.diff_ids")
    if not all(is_digest(d) for d in diff_ids):
        raise SourceError(f"{ref}: the config's rootfs.diff_ids are not all sha256 digests")
    return diff_ids


def _from_manifest(
    ref: Reference,
    manifest: dict[str, Any],
    manifest_digest: str,
    read: Callable[[str], bytes],
    open_blob: Callable[[str], IO[bytes]],
) -> Fetched:
    try:
        config_digest = manifest["config"]["digest"]
        descriptors = manifest["layers"]
    except (KeyError, TypeError) as err:
        raise SourceError(f"{ref}: manifest lacks {err}") from err
    if not isinstance(descriptors, list) or not all(
        isinstance(d, dict)
        and isinstance(d.get("digest"), str)
        and isinstance(d.get("size", 0), int)
        for d in descriptors
    ):
        raise SourceError(f"{ref}: manifest layers must be descriptors with a digest and size")
    config = _json(
        _verified(read(_blob_name(config_digest)), config_digest, f"{ref}: config"),
        f"{ref}: config",
    )
    diff_ids = _diff_ids(ref, config, len(descriptors))
    layers = []
    for i, d in enumerate(descriptors):
        name = _blob_name(d["digest"])
        layers.append(
            Layer(
                f"layer {i + 1} {d['digest'][:19]}",
                _opener(open_blob, name),
                digest=d["digest"],
                diff_id=diff_ids[i],
                size=int(d.get("size") or 0),
            )
        )
    return Fetched(
        config=config,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layers=layers,
        provenance={"source": str(ref), "manifest": manifest},
    )


def _from_docker_archive(ref: Reference, access: LocalAccess) -> Fetched:
    archive = _tar_file(ref, access)
    members = {m.name.lstrip("./"): m for m in archive.getmembers() if m.isreg()}

    def open_member(name: str) -> IO[bytes]:
        member = members.get(name.lstrip("./"))
        stream = archive.extractfile(member) if member else None
        if stream is None:
            raise SourceError(f"{ref}: {name} is missing from the archive")
        return stream

    with open_member("manifest.json") as f:
        entries = json.loads(f.read())
    if not isinstance(entries, list) or len(entries) != 1:
        raise SourceError(f"{ref}: expected one image in manifest.json, found {len(entries)}")
    entry = entries[0]
    with open_member(entry["Config"]) as f:
        config_bytes = f.read()
    config = _json(config_bytes, f"{ref}: config")
    diff_ids = _diff_ids(ref, config, len(entry["Layers"]))
    layers = [
        Layer(f"layer {i + 1} {name}", _opener(open_member, name), diff_id=diff_ids[i])
        for i, name in enumerate(entry["Layers"])
    ]
    return Fetched(
        config=config,
        config_digest=_digest_of(config_bytes),
        layers=layers,
        provenance={"source": str(ref), "repo_tags": entry.get("RepoTags")},
    )


def _from_registry(
    ref: Reference, workdir: str, registry: Registry, progress: Progress | None
) -> Fetched:
    where = str(ref)
    body, media, digest = registry.manifest(ref.repository, ref.digest or ref.tag)
    resolved = digest  # what the reference names: cosign signs this one
    manifest = _json(body, f"{where}: manifest")
    if media in INDEX_TYPES or "manifests" in manifest:
        digest = select_platform(manifest, where)
        body, media, digest = registry.manifest(ref.repository, digest)
        manifest = _json(body, f"{where}: manifest")
    if ref.transport == "oras":
        return _oras(ref, manifest, digest, workdir, registry, progress)
    _container_image(ref, manifest)

    def read(name: str) -> bytes:
        return registry.blob_bytes(ref.repository, "sha256:" + name[-64:])

    # Layers stream straight from the registry into the merge, which checks their digests:
    # nothing but the finished image touches the disk.
    image = _from_manifest(
        ref,
        manifest,
        digest,
        read,
        lambda n: registry.open_blob(ref.repository, "sha256:" + n[-64:]),
    )
    image.provenance["registry_digest"] = digest
    image.provenance["resolved_digest"] = resolved
    return image


def _is_squashfs_artifact(manifest: dict[str, Any]) -> bool:
    layers = manifest.get("layers")
    config = manifest.get("config")
    return (
        manifest.get("artifactType") == ARTIFACT_TYPE
        or (isinstance(config, dict) and config.get("mediaType") == SQUASHFS_CONFIG)
        or (
            isinstance(layers, list)
            and any(isinstance(d, dict) and d.get("mediaType") == SQUASHFS_ARTIFACT for d in layers)
        )
    )


def _container_image(ref: Reference, manifest: dict[str, Any]) -> None:
    """Refuse, naming what it is, a docker:// manifest that is not a container image: a pyhpc
    SquashFS artifact (pull it with oras://) or another artifact whose layers are no tar."""
    if _is_squashfs_artifact(manifest):
        oras = dataclasses.replace(ref, transport="oras")
        raise SourceError(
            f"{ref}: this is an oras:// artifact (a SquashFS pushed by pyhpc), not a container "
            f"image; use {oras}"
        )
    for i, d in enumerate(manifest.get("layers") or []):
        media = d.get("mediaType", "") if isinstance(d, dict) else ""
        if media and "tar" not in media:
            raise SourceError(
                f"{ref}: layer {i + 1} has media type {media!r}: not a container image layer "
                "(an OCI artifact?)"
            )


def _oras(
    ref: Reference,
    manifest: dict[str, Any],
    digest: str,
    workdir: str,
    registry: Registry,
    progress: Progress | None,
) -> Fetched:
    layers = [d for d in manifest.get("layers", []) if d.get("mediaType") == SQUASHFS_ARTIFACT]
    if len(layers) != 1:
        hint = f"; for a container image use {dataclasses.replace(ref, transport='docker')}"
        raise SourceError(
            f"{ref}: not a pyhpc SquashFS artifact (no {SQUASHFS_ARTIFACT} layer)"
            + ("" if _is_squashfs_artifact(manifest) else hint)
        )
    path = os.path.join(workdir, "image.sqsh")
    registry.blob(ref.repository, layers[0]["digest"], path)
    if progress:
        progress(f"downloaded {layers[0]['digest'][:19]}")
    config = _json(
        registry.blob_bytes(ref.repository, manifest["config"]["digest"]),
        f"{ref}: config",
    )
    signature = ""
    for d in manifest.get("layers", []):
        if d.get("mediaType") == SIGNATURE_ARTIFACT:  # the signature travels with the image
            signature = os.path.join(workdir, "image.sqsh.dsse.json")
            registry.blob(ref.repository, d["digest"], signature)
    return Fetched(
        config=config.get("image_config", {}),
        manifest_digest=digest,
        squashfs=path,
        signature=signature,
        # What the pusher says of the image's history: kept apart, never taken for what this
        # import itself saw (a forged "resolved_digest" must not vouch for anything).
        provenance={"source": str(ref), "manifest": manifest, "artifact": config.get("provenance")},
    )


def fetch(
    ref: Reference,
    workdir: str,
    progress: Progress | None = None,
    registry: Registry | None = None,
    local: LocalAccess | None = None,
    pull_timeout: float | None = None,
    keychain: Keychain | None = None,
) -> Fetched:
    """Everything needed to build ref's SquashFS; downloads go into workdir. local: how a
    local source may be read (default: as given, for root importing by hand). pull_timeout:
    how long a registry pull goes on retrying (default: the Registry's). keychain: where a
    registry's login comes from, when no registry client is given."""
    access = local or LocalAccess()
    try:
        if ref.transport in ("oci", "oci-archive"):
            return _from_layout(ref, access)
        if ref.transport == "docker-archive":
            return _from_docker_archive(ref, access)
        if ref.transport == "dir":
            tree = DirTree(ref, _open_local(ref, access, directory=True), access)
            return Fetched(directory=ref.path, tree=tree, provenance={"source": str(ref)})
        if ref.transport == "file":
            if not os.path.isfile(ref.path):
                raise SourceError(f"{ref}: no such file")
            return Fetched(squashfs=ref.path, provenance={"source": str(ref)})
        client = registry or Registry(ref.registry, keychain)
        client.begin(pull_timeout)
        fetched = _from_registry(ref, workdir, client, progress)
        fetched.private = client.logged_in
        return fetched
    except RegistryError as err:
        raise SourceError(str(err)) from err
    except (KeyError, TypeError, ValueError) as err:
        raise SourceError(f"{ref}: malformed image metadata ({err})") from err


def local_identity(ref: Reference, local: LocalAccess | None = None) -> str:
    """Who and what a local source is now (its root's device, inode, owner and change times),
    opened as an import opens it: a store hit for a local reference is believed only while
    this is what the import saw (another tenant may have put another tree at the path)."""
    access = local or LocalAccess()
    directory = ref.transport in ("dir", "oci")
    try:
        fd = _open_local(ref, access, directory=directory)
    except SourceError:
        return ""
    try:
        st = os.fstat(fd)
        parts = [st.st_dev, st.st_ino, st.st_uid, st.st_gid, st.st_mode, st.st_ctime_ns]
        if ref.transport == "oci":  # a new tag changes index.json, not the directory
            try:
                index = os.stat("index.json", dir_fd=fd, follow_symlinks=False)
                parts += [index.st_ino, index.st_ctime_ns]
            except OSError:
                pass
        return ":".join(map(str, parts))
    finally:
        os.close(fd)


def check_access(
    ref: Reference,
    registry: Registry | None = None,
    keychain: Keychain | None = None,
    pull_timeout: float | None = None,
    **_: Any,
) -> None:
    """SourceError unless the login at hand may read ref in its registry: asked before a
    stored image that was pulled with a login is handed to anyone again."""
    client = registry or Registry(ref.registry, keychain)
    client.begin(pull_timeout)
    try:
        client.can_read(ref.repository, ref.digest or ref.tag)
    except RegistryError as err:
        raise SourceError(
            f"{ref} is private, and its registry does not let this login read it ({err})"
        ) from err


XATTR_PREFIXES = ("user.", "trusted.", "security.")  # what SquashFS can store


def _xattrs(fd: int) -> list[str]:
    """The extended attributes' names; none where the filesystem has none (a SquashFS built
    without them answers EOPNOTSUPP)."""
    try:
        return os.listxattr(fd)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return []
        raise


class DirTree:
    """A dir: source written as one tar stream, walked by descriptor: each entry is looked at
    without following it (fstatat), directories and files are opened beneath their parent's
    descriptor with no symlink allowed and their type checked again on the open descriptor,
    symlinks are recorded as symlinks, FIFOs as FIFOs (never opened); device nodes are
    refused as in layers, sockets left out. An entry swapped while it is read fails the
    import; it never makes root read what it now points at."""

    def __init__(
        self,
        ref: Reference,
        fd: int,
        access: LocalAccess,
        ids: Callable[[int], int] | None = None,
    ) -> None:
        self.ref, self.fd, self.access = ref, fd, access
        self.ids = ids or (lambda i: i)  # host id -> the id recorded
        self.links: dict[tuple[int, int], str] = {}
        self.count = 0
        weakref.finalize(self, os.close, fd)

    def __call__(self, out: IO[bytes]) -> int:
        self.count = 0
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            self._directory(tar, self.fd, ".", os.fstat(self.fd))
        return self.count

    def _changed(self, path: str, now: str) -> SourceError:
        return SourceError(f"{self.ref}: {path!r} changed while it was read ({now}); import again")

    def _info(self, path: str, kind: bytes, st: os.stat_result, fd: int = -1) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = kind
        info.mode, info.uid, info.gid = (
            st.st_mode & 0o7777,
            self.ids(st.st_uid),
            self.ids(st.st_gid),
        )
        info.mtime, info.uname, info.gname = int(st.st_mtime), "", ""
        if fd >= 0:
            info.pax_headers = {
                "SCHILY.xattr." + name: os.getxattr(fd, name).decode("utf-8", "surrogateescape")
                for name in _xattrs(fd)
                if name.startswith(XATTR_PREFIXES)
            }
        self.count += 1
        return info

    def _open(self, dirfd: int, name: str, flags: int, path: str) -> int:
        try:
            return linux.openat2(dirfd, name, flags | os.O_NOCTTY, linux.STRICT)
        except OSError as err:
            why = "now a symlink, not followed" if err.errno == errno.ELOOP else str(err.strerror)
            raise self._changed(path, why) from err

    def _directory(self, tar: tarfile.TarFile, fd: int, path: str, st: os.stat_result) -> None:
        _public(st, f"{self.ref}: {path!r}", self.access)
        tar.addfile(self._info(path, tarfile.DIRTYPE, st, fd))
        with os.scandir(fd) as listing:
            names = sorted(entry.name for entry in listing)
        for name in names:
            self._entry(tar, fd, name, name if path == "." else f"{path}/{name}")

    def _entry(self, tar: tarfile.TarFile, dirfd: int, name: str, path: str) -> None:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError as err:
            raise self._changed(path, "gone") from err
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            fd = self._open(dirfd, name, os.O_RDONLY | os.O_DIRECTORY, path)
            try:
                self._directory(tar, fd, path, os.fstat(fd))
            finally:
                os.close(fd)
        elif stat.S_ISREG(mode):
            self._file(tar, dirfd, name, path, st)
        elif stat.S_ISLNK(mode):
            info = self._info(path, tarfile.SYMTYPE, st)
            try:
                info.linkname = os.readlink(name, dir_fd=dirfd)
            except OSError as err:
                raise self._changed(path, "no longer a symlink") from err
            tar.addfile(info)
        elif stat.S_ISFIFO(mode):
            tar.addfile(self._info(path, tarfile.FIFOTYPE, st))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise SourceError(f"{self.ref}: device node {path!r} is not allowed in images")
        # a socket means nothing in an image: left out

    def _file(
        self, tar: tarfile.TarFile, dirfd: int, name: str, path: str, st: os.stat_result
    ) -> None:
        first = self.links.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
        if first is not None:
            info = self._info(path, tarfile.LNKTYPE, st)
            info.linkname = first
            tar.addfile(info)
            return
        # O_NONBLOCK: a FIFO swapped in is opened without waiting, then refused below.
        fd = self._open(dirfd, name, os.O_RDONLY | os.O_NONBLOCK, path)
        with os.fdopen(fd, "rb") as f:
            real = os.fstat(fd)
            if not stat.S_ISREG(real.st_mode):
                raise self._changed(path, "no longer a regular file")
            _public(real, f"{self.ref}: {path!r}", self.access)
            info = self._info(path, tarfile.REGTYPE, real, fd)
            info.size = real.st_size
            try:
                tar.addfile(info, f)
            except BrokenPipeError:
                raise  # the builder stopped; its own message says why
            except OSError as err:
                raise self._changed(path, str(err)) from err
        if real.st_nlink > 1:
            self.links[(real.st_dev, real.st_ino)] = path
