"""The content-addressed image store: SquashFS files named by their SHA-256, an index of
references, and each image's provenance.

    STORE/sha256/<hex>.sqsh     the images (read-only, never changed once written)
    STORE/meta/<hex>.json       where each came from: source, manifest, config, digests
    STORE/refs/<key>.json       reference -> digest
    STORE/locks/<key>.lock      one import per reference at a time (flock)
    STORE/tmp/                  imports in progress; nothing there is ever visible as an image

Writes are atomic (write to tmp, fsync, rename), so an interrupted import leaves no half image.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nomad_driver.images import reference, squashfs
from nomad_driver.util.digest import file_digest, remember
from nomad_driver.util.files import write_atomic

if TYPE_CHECKING:  # loaded by _import only: a start from a stored image needs no HTTP stack
    from nomad_driver.images import merge, sources

Progress = Callable[[str], None]


class StoreError(RuntimeError):
    """An import or store operation failed; nothing half-written was left behind."""


@dataclass(frozen=True)
class StoredImage:
    digest: str
    path: str
    meta: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The OCI image config's runtime part: Env, Entrypoint, Cmd, WorkingDir, User, Labels."""
        value = self.meta.get("image_config") or {}
        return value if isinstance(value, dict) else {}


def _runtime_config(ref: reference.Reference, fetched: sources.Fetched) -> dict[str, Any]:
    """Env, Entrypoint, Cmd, WorkingDir, User...: the "config" part of an OCI image config
    (an ORAS artifact carries just that part; a plain SquashFS file has none)."""
    if ref.transport == "oras":
        return fetched.config
    if fetched.squashfs:
        return {}
    value: dict[str, Any] = fetched.config.get("config", fetched.config)
    return value


def _key(ref: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(ref.encode()).digest()).decode().rstrip("=")


class Store:
    def __init__(self, root: str, max_bytes: int = 0, level: int = squashfs.DEFAULT_LEVEL) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.level = level  # zstd level of imported images: low is fast, high is small

    def _dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def image_path(self, digest: str) -> str:
        return os.path.join(self.root, "sha256", digest.partition(":")[2] + ".sqsh")

    @contextmanager
    def _lock(self, ref: str) -> Iterator[None]:
        fd = os.open(
            os.path.join(self._dir("locks"), _key(ref) + ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- lookups -----------------------------------------------------------------------------

    def lookup(self, ref: str) -> StoredImage | None:
        """The stored image for a reference (or a digest), if it is complete."""
        if ref.startswith("sha256:"):
            digest = ref
        else:
            try:
                with open(
                    os.path.join(self.root, "refs", _key(ref) + ".json"), encoding="utf-8"
                ) as f:
                    digest = json.load(f)["digest"]
            except (OSError, ValueError, KeyError):
                return None
        path = self.image_path(digest)
        try:
            with open(
                os.path.join(self.root, "meta", digest.partition(":")[2] + ".json"),
                encoding="utf-8",
            ) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        return StoredImage(digest, path, meta) if os.path.isfile(path) else None

    def images(self) -> list[StoredImage]:
        out = []
        meta_dir = os.path.join(self.root, "meta")
        for name in sorted(os.listdir(meta_dir)) if os.path.isdir(meta_dir) else []:
            found = self.lookup("sha256:" + name.removesuffix(".json"))
            if found:
                out.append(found)
        return out

    def references(self) -> dict[str, str]:
        refs: dict[str, str] = {}
        refs_dir = os.path.join(self.root, "refs")
        for name in os.listdir(refs_dir) if os.path.isdir(refs_dir) else []:
            try:
                with open(os.path.join(refs_dir, name), encoding="utf-8") as f:
                    entry = json.load(f)
                refs[entry["ref"]] = entry["digest"]
            except (OSError, ValueError, KeyError):
                continue
        return refs

    def size(self) -> int:
        return sum(os.path.getsize(i.path) for i in self.images())

    # ---- import ------------------------------------------------------------------------------

    def ensure(
        self,
        text: str,
        progress: Progress | None = None,
        meter: merge.Meter | None = None,
        **fetch_kw: Any,
    ) -> StoredImage:
        """The image for a reference, imported on first use. Concurrent callers for the same
        reference wait for the one import instead of doing their own."""
        ref = reference.parse(text)
        name = str(ref)
        # Pinned references never change: no lock. A tag may be being pulled again: wait.
        if not ref.remote or ref.digest:
            found = self._intact(self.lookup(name), progress)
            if found is not None:
                return found
        with self._lock(name):
            found = self._intact(self.lookup(name), progress)
            if found is not None:
                return found
            return self._import(ref, progress, meter, **fetch_kw)

    def _intact(self, image: StoredImage | None, progress: Progress | None) -> StoredImage | None:
        """image, if its file still has its digest (hashed again only when the file changed
        since last read); a damaged file is removed (a task that has it mounted keeps its
        inode), and None makes the caller import it again."""
        if image is None:
            return None
        try:
            if file_digest(image.path, self._dir("digests")) == image.digest:
                return image
        except OSError:
            pass
        try:
            os.unlink(image.path)
        except OSError:
            pass
        if progress:
            progress(
                f"stored image {image.digest} no longer matches its digest (damaged on disk); "
                "removed, importing it again"
            )
        return None

    def pull(
        self,
        text: str,
        progress: Progress | None = None,
        meter: merge.Meter | None = None,
        **fetch_kw: Any,
    ) -> StoredImage:
        """Import (again) even if the reference is known: a tag may have moved."""
        ref = reference.parse(text)
        with self._lock(str(ref)):
            return self._import(ref, progress, meter, **fetch_kw)

    def _import(
        self,
        ref: reference.Reference,
        progress: Progress | None,
        meter: merge.Meter | None = None,
        **fetch_kw: Any,
    ) -> StoredImage:
        self._clear_abandoned()
        from nomad_driver.images import merge, sources

        work = tempfile.mkdtemp(prefix=f"import-{os.getpid()}-", dir=self._dir("tmp"))
        try:
            fetched = sources.fetch(ref, work, progress, **fetch_kw)
            built = os.path.join(work, "image.sqsh")
            started = time.monotonic()
            if fetched.squashfs and ref.transport == "file":
                shutil.copyfile(fetched.squashfs, built)
            elif fetched.squashfs:
                os.replace(fetched.squashfs, built)
            elif fetched.tree is not None:
                if progress:
                    progress(f"building SquashFS from {fetched.directory}")
                squashfs.from_tar(fetched.tree, built, self.level)
            else:
                if progress:
                    progress(f"merging {len(fetched.layers)} layers into SquashFS")
                squashfs.from_tar(
                    lambda pipe: merge.merge(fetched.layers, pipe, progress, meter),
                    built,
                    self.level,
                )
            digest = file_digest(built)
            self._check_cap(os.path.getsize(built), digest)
            meta = {
                "digest": digest,
                "size": os.path.getsize(built),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started, 3),
                "source": str(ref),
                "manifest_digest": fetched.manifest_digest,
                "config_digest": fetched.config_digest,
                "layers": [layer.digest or layer.label for layer in fetched.layers],
                "image_config": _runtime_config(ref, fetched),
                "provenance": fetched.provenance,
            }
            hexpart = digest.partition(":")[2]
            target = self.image_path(digest)
            self._dir("sha256")
            if not os.path.exists(target):
                os.chmod(built, 0o444)
                with open(built, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(built, target)
                remember(target, digest, self._dir("digests"))
            if fetched.signature:
                os.replace(fetched.signature, target + ".dsse.json")
            write_atomic(
                os.path.join(self._dir("meta"), hexpart + ".json"), json.dumps(meta, indent=1)
            )
            self._set_ref(str(ref), digest)
            return StoredImage(digest, target, meta)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise StoreError(
                    f"importing {ref}: no space left in the store {self.root}"
                ) from err
            raise StoreError(f"importing {ref}: {err}") from err
        except squashfs.BuildError as err:
            if self._full(err.written):  # the builder only says "I/O error"
                raise StoreError(
                    f"importing {ref}: no space left in the store {self.root} ({err})"
                ) from err
            raise StoreError(f"importing {ref}: {err}") from err
        except (sources.SourceError, merge.LayerError, reference.ReferenceError) as err:
            raise StoreError(f"importing {ref}: {err}") from err
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def copy_in(self, fd: int, source: str) -> StoredImage:
        """A private copy of the SquashFS file open at fd, stored by the digest of the copy:
        an image its owner can still change is run from bytes that no longer can."""
        self._clear_abandoned()
        work = tempfile.mkdtemp(prefix=f"import-{os.getpid()}-", dir=self._dir("tmp"))
        try:
            built = os.path.join(work, "image.sqsh")
            out = os.open(built, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                size, offset = os.fstat(fd).st_size, 0
                while offset < size:
                    copied = os.copy_file_range(fd, out, size - offset, offset, offset)
                    if copied == 0:
                        break
                    offset += copied
                os.fsync(out)
            finally:
                os.close(out)
            digest = file_digest(built)
            self._check_cap(offset, digest)
            target = self.image_path(digest)
            self._dir("sha256")
            if not os.path.exists(target):
                os.replace(built, target)
                remember(target, digest, self._dir("digests"))
            meta = {
                "digest": digest,
                "size": offset,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": f"copy of {source}",
            }
            hexpart = digest.partition(":")[2]
            meta_path = os.path.join(self._dir("meta"), hexpart + ".json")
            if not os.path.exists(meta_path):
                write_atomic(meta_path, json.dumps(meta, indent=1))
            return StoredImage(digest, target, meta)
        except OSError as err:
            raise StoreError(f"copying {source} into the store: {err.strerror or err}") from err
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _clear_abandoned(self) -> None:
        """Remove the work directories of imports whose process is gone (a killed plugin)."""
        tmp = self._dir("tmp")
        for name in os.listdir(tmp):
            pid = name.split("-")[1] if name.startswith("import-") else ""
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)

    def _full(self, written: int = 0) -> bool:
        """Whether the store's disk is (or was, before the builder removed its output) full:
        less than 1 MB free, or the output had grown to within 4 MB of all there is."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        return free < 1 << 20 or (written > 0 and written + (4 << 20) >= free)

    def _check_cap(self, adding: int, digest: str) -> None:
        if self.max_bytes and not os.path.exists(self.image_path(digest)):
            used = self.size()
            if used + adding > self.max_bytes:
                raise StoreError(
                    f"the store would grow to {(used + adding) / 1e6:.0f} MB, over its cap of "
                    f"{self.max_bytes / 1e6:.0f} MB; run `pyhpc image prune`"
                )

    def _set_ref(self, ref: str, digest: str) -> None:
        write_atomic(
            os.path.join(self._dir("refs"), _key(ref) + ".json"),
            json.dumps({"ref": ref, "digest": digest}),
        )

    def tag(self, digest: str, ref: str) -> None:
        self._set_ref(str(reference.parse(ref)) if not ref.startswith("sha256:") else ref, digest)

    # ---- removal -----------------------------------------------------------------------------

    def remove(self, text: str, in_use: Callable[[str], bool]) -> list[str]:
        """Drop a reference (or every reference of a digest); delete the image when nothing
        refers to it and no task uses it. Returns what was deleted."""
        found = self.lookup(text if text.startswith("sha256:") else str(reference.parse(text)))
        if found is None:
            raise StoreError(f"no image {text!r} in the store {self.root}")
        for ref, digest in self.references().items():
            if digest == found.digest and (
                text.startswith("sha256:") or ref == str(reference.parse(text))
            ):
                os.unlink(os.path.join(self.root, "refs", _key(ref) + ".json"))
        if found.digest in self.references().values():
            return []
        if in_use(found.digest):
            raise StoreError(
                f"image {found.digest} is in use by a running task; reference removed, image kept"
            )
        return self._delete(found.digest)

    def prune(self, in_use: Callable[[str], bool], everything: bool = False) -> list[str]:
        """Delete images no reference names (all unused ones with everything=True), never one a
        running task uses; clear abandoned temporary imports."""
        refs = self.references()
        deleted: list[str] = []
        for image in self.images():
            if in_use(image.digest) or (not everything and image.digest in refs.values()):
                continue
            for ref, digest in refs.items():
                if digest == image.digest:
                    os.unlink(os.path.join(self.root, "refs", _key(ref) + ".json"))
            deleted += self._delete(image.digest)
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp) if os.path.isdir(tmp) else []:
            path = os.path.join(tmp, name)
            if time.time() - os.path.getmtime(path) > 3600:  # an import killed long ago
                shutil.rmtree(path, ignore_errors=True)
        return deleted

    def _delete(self, digest: str) -> list[str]:
        hexpart = digest.partition(":")[2]
        for path in (os.path.join(self.root, "meta", hexpart + ".json"), self.image_path(digest)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return [digest]
