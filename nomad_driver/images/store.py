"""The content-addressed image store: SquashFS files named by their SHA-256, an index of
references, and each image's provenance.

    STORE/sha256/<hex>.sqsh     the images (read-only, never changed once written)
    STORE/meta/<hex>.json       where each came from: every source, manifest, config, digests;
                                its modification time is the image's last use
    STORE/refs/<key>.json       reference -> digest
    STORE/locks/<key>.lock      one import per reference at a time (flock)
    STORE/locks/<hex>.hold      held (shared flock) while an import or a start uses the image
    STORE/tmp/                  imports in progress; nothing there is ever visible as an image

Writes are atomic (write to tmp, fsync, rename), so an interrupted import leaves no half image.
With a size cap, an import makes room by evicting the least recently used images that no task
uses (a running task's image is attached to a loop device; the caller may also say who uses
what, as the driver's shared mounts do) and no import or start holds.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import glob
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
from nomad_driver.images.errors import StoreError as StoreError  # its home before errors
from nomad_driver.util.digest import file_digest, remember
from nomad_driver.util.files import write_atomic

if TYPE_CHECKING:  # loaded by _import only: a start from a stored image needs no HTTP stack
    from nomad_driver.images import merge, sources

Progress = Callable[[str], None]
InUse = Callable[[str], bool]
LOOP_BACKING = "/sys/block/loop*/loop/backing_file"


class StoreAccessError(StoreError):
    """This user may not write the store."""

    grpc_status = "PERMISSION_DENIED"


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


# What one import of one reference saw: kept with the reference, since the same SquashFS
# bytes may come from several images (other configs, other manifests, other owners).
REF_FIELDS = (
    "source",
    "manifest_digest",
    "config_digest",
    "layers",
    "image_config",
    "provenance",
    "source_identity",
)


def _key(ref: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(ref.encode()).digest()).decode().rstrip("=")


def attached_images() -> set[str]:
    """The real paths of the files attached to loop devices: every mounted image, whichever
    run_dir (driver or `pyhpc run`) mounted it."""
    attached = set()
    for entry in glob.glob(LOOP_BACKING):
        try:
            with open(entry, encoding="utf-8", errors="replace") as f:
                attached.add(f.read().strip())
        except OSError:
            continue
    return attached


class Store:
    def __init__(
        self,
        root: str,
        max_bytes: int = 0,
        level: int = squashfs.DEFAULT_LEVEL,
        in_use: InUse | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.level = level  # zstd level of imported images: low is fast, high is small
        self.in_use = in_use  # digest -> whether a task uses it, beyond the loop devices

    def _dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except PermissionError as err:
            raise StoreAccessError(
                f"cannot write the image store {self.root} as uid {os.geteuid()} ({err.strerror})"
            ) from err
        return path

    def image_path(self, digest: str) -> str:
        return os.path.join(self.root, "sha256", digest.partition(":")[2] + ".sqsh")

    def _meta_path(self, digest: str) -> str:
        return os.path.join(self.root, "meta", digest.partition(":")[2] + ".json")

    @contextmanager
    def _flock(self, name: str, how: int) -> Iterator[bool]:
        """flock on STORE/locks/name; yields False when how has LOCK_NB and it is taken."""
        try:
            fd = os.open(
                os.path.join(self._dir("locks"), name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except PermissionError as err:
            raise StoreAccessError(
                f"cannot write the image store {self.root} as uid {os.geteuid()} ({err.strerror})"
            ) from err
        try:
            try:
                fcntl.flock(fd, how)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    @contextmanager
    def _lock(self, ref: str) -> Iterator[None]:
        with self._flock(_key(ref) + ".lock", fcntl.LOCK_EX):
            yield

    @contextmanager
    def hold(self, digest: str) -> Iterator[None]:
        """Keep the image from being evicted while the block runs (an import placing it, a
        start opening it). Any number may hold one image at once."""
        with self._flock(digest.partition(":")[2] + ".hold", fcntl.LOCK_SH):
            yield

    # ---- lookups -----------------------------------------------------------------------------

    def lookup(self, ref: str, strict: bool = False) -> StoredImage | None:
        """The stored image for a reference (or a full digest), if it is complete. For a
        reference, what its own import saw (config, manifest and config digests, provenance)
        comes from its own record: the same bytes imported from elsewhere (another tenant's
        image with these layers and another config) change nothing of it. strict: a record
        from before references kept their own (legacy) counts as absent, to be imported again."""
        record: dict[str, Any] = {}
        if ref.startswith("sha256:"):
            digest = ref
        else:
            try:
                record = self._ref_record(ref)
                digest = str(record["digest"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
            if strict and "image_config" not in record:
                return None
        path = self.image_path(digest)
        try:
            with open(self._meta_path(digest), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        meta = {**meta, **{k: record[k] for k in REF_FIELDS if k in record}}
        return StoredImage(digest, path, meta) if os.path.isfile(path) else None

    def _ref_record(self, ref: str) -> dict[str, Any]:
        with open(os.path.join(self.root, "refs", _key(_normal(ref)) + ".json"), "rb") as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record

    def private(self, ref: str) -> bool:
        """Whether ref was pulled with a login (its registry keeps it from anonymous readers)."""
        try:
            return self._ref_record(ref).get("private") is True
        except (OSError, ValueError):
            return False

    def resolve(self, text: str) -> StoredImage:
        """The stored image a user names: a reference, a digest, or a unique prefix of one as
        `pyhpc image ls` prints it ("sha256:0123abcd4567", or the hex alone). StoreError says
        what is missing or ambiguous."""
        name = text.strip()
        hexpart = name.removeprefix("sha256:").lower()
        if self.digest_form(name):
            if not _is_hex(hexpart) or len(hexpart) > 64:
                raise StoreError(f"{text!r} is not a sha256 digest or a prefix of one")
            matches = [i for i in self.images() if i.digest[7:].startswith(hexpart)]
            if len(matches) > 1:
                raise StoreError(
                    f"{text!r} is the start of {len(matches)} images' digests "
                    f"({', '.join(i.digest[:19] for i in matches)}); give more of it"
                )
            if not matches:
                raise StoreError(f"no image {text!r} in the store {self.root}")
            return matches[0]
        try:
            normal = str(reference.parse(name))
        except reference.ReferenceError as err:
            raise StoreError(f"{err} (or give a digest as `pyhpc image ls` prints it)") from err
        found = self.lookup(normal)
        if found is None:
            raise StoreError(f"no image {normal} in the store {self.root}")
        return found

    @staticmethod
    def digest_form(text: str) -> bool:
        """Whether text names an image by digest: "sha256:..." or at least 4 hex digits (never
        a reference: those start with a transport or '/')."""
        name = text.strip()
        return name.startswith("sha256:") or (len(name) >= 4 and _is_hex(name.lower()))

    def images(self) -> list[StoredImage]:
        out = []
        meta_dir = os.path.join(self.root, "meta")
        for name in sorted(os.listdir(meta_dir)) if os.path.isdir(meta_dir) else []:
            if not name.endswith(".json"):
                continue
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
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return refs

    def size(self) -> int:
        total = 0
        for image in self.images():
            try:
                total += os.path.getsize(image.path)
            except FileNotFoundError:
                continue  # evicted or removed meanwhile
        return total

    def last_used(self, digest: str) -> float:
        try:
            return os.stat(self._meta_path(digest)).st_mtime
        except OSError:
            return 0.0

    def _used_now(self, digest: str) -> None:
        try:
            os.utime(self._meta_path(digest))
        except OSError:
            pass

    def used(self, digest: str) -> bool:
        """Whether a task uses the image: attached to a loop device (mounted), or in use as
        the caller's in_use says."""
        path = os.path.realpath(self.image_path(digest))
        return path in attached_images() or bool(self.in_use and self.in_use(digest))

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
            found = self._found(name, progress)
            if found is not None and self._reusable(ref, found, fetch_kw):
                return found
        with self._lock(name):
            found = self._found(name, progress)
            if found is not None and self._reusable(ref, found, fetch_kw):
                return found
            return self._import(ref, progress, meter, **fetch_kw)

    def _reusable(
        self, ref: reference.Reference, found: StoredImage, fetch_kw: dict[str, Any]
    ) -> bool:
        """Whether found may be handed to whoever asks. The store is shared by every tenant
        of the node: a local reference's stored import stands only while the source is the
        one imported (False: import again); an image pulled with a login is handed out again
        only after its registry lets this caller's login read it (StoreError if not)."""
        from nomad_driver.images import sources

        if not ref.remote:
            now = sources.local_identity(ref, fetch_kw.get("local"))
            return bool(now) and found.meta.get("source_identity") == now
        if self.private(str(ref)):
            try:
                sources.check_access(ref, **fetch_kw)
            except sources.SourceError as err:
                raise StoreError(str(err)) from err
        return True

    def _found(self, name: str, progress: Progress | None) -> StoredImage | None:
        """The stored image of a reference, intact, marked as just used; None to import."""
        image = self.lookup(name, strict=True)
        if image is None:
            return None
        with self.hold(image.digest):
            found = self._intact(self.lookup(name, strict=True), progress)  # evicted meanwhile?
            if found is not None:
                self._used_now(found.digest)
            return found

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
        from nomad_driver.images.registry import RegistryError

        work = tempfile.mkdtemp(prefix=f"import-{os.getpid()}-", dir=self._dir("tmp"))
        # Read before the import: a source swapped meanwhile differs next time, and is
        # imported again then.
        identity = "" if ref.remote else sources.local_identity(ref, fetch_kw.get("local"))
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
            target = self.image_path(digest)
            with self.hold(digest):
                self._place(built, digest, progress)
                if fetched.signature:
                    os.replace(fetched.signature, target + ".dsse.json")
                own = {k: meta[k] for k in REF_FIELDS if k in meta}
                if identity:
                    own["source_identity"] = identity
                meta = {**self._write_meta(digest, meta), **own}
                self._set_ref(str(ref), digest, fetched.private, own)
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
        except (
            sources.SourceError,
            merge.LayerError,
            reference.ReferenceError,
            RegistryError,
        ) as err:
            raise StoreError(f"importing {ref}: {err}") from err
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _place(self, built: str, digest: str, progress: Progress | None) -> None:
        """Move a finished image into the store (it is read-only from then on), after making
        room for it under the cap. The caller holds digest."""
        target = self.image_path(digest)
        self._dir("sha256")
        with self._flock(".cap", fcntl.LOCK_EX):  # one import at a time counts and places
            if os.path.exists(target):
                return
            self._make_room(os.path.getsize(built), digest, progress)
            os.chmod(built, 0o444)
            with open(built, "rb") as f:
                os.fsync(f.fileno())
            os.replace(built, target)
        remember(target, digest, self._dir("digests"))

    def _write_meta(self, digest: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Write an image's metadata, keeping every source it was imported from before (in
        "sources", first first); "source" and the digests are those of this import."""
        with self._flock(digest.partition(":")[2] + ".meta", fcntl.LOCK_EX):
            try:
                with open(self._meta_path(digest), encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = {}
            earlier = old.get("sources") if isinstance(old, dict) else None
            if not isinstance(earlier, list):
                earlier = [old["source"]] if isinstance(old, dict) and old.get("source") else []
            sources = [s for s in earlier if isinstance(s, str) and s != meta["source"]]
            meta = {**meta, "sources": [*sources, meta["source"]]}
            write_atomic(
                os.path.join(self._dir("meta"), digest.partition(":")[2] + ".json"),
                json.dumps(meta, indent=1),
            )
        return meta

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
            target = self.image_path(digest)
            with self.hold(digest):
                self._place(built, digest, None)
                meta = {
                    "digest": digest,
                    "size": offset,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "source": f"copy of {source}",
                }
                existing = self.lookup(digest)  # an import of the same bytes keeps its own
                if existing is not None:
                    self._used_now(digest)
                    meta = existing.meta
                else:
                    meta = self._write_meta(digest, meta)
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

    def _make_room(self, adding: int, digest: str, progress: Progress | None) -> None:
        """Under the cap, evict least recently used images until `adding` bytes fit; never one
        a task uses or someone holds. StoreError, with nothing evicted in vain, if even that
        cannot make room. The caller holds the .cap lock: the files counted are all there is
        (an image being placed by another import is counted, and held)."""
        if not self.max_bytes:
            return
        if adding > self.max_bytes:
            raise StoreError(
                f"the image ({adding / 1e6:.1f} MB) is larger than the store's cap of "
                f"{self.max_bytes / 1e6:.1f} MB (store_max_mb)"
            )
        top = os.path.join(self.root, "sha256")
        sizes = {
            "sha256:" + name.removesuffix(".sqsh"): _size(os.path.join(top, name))
            for name in os.listdir(top)
            if name.endswith(".sqsh") and "sha256:" + name.removesuffix(".sqsh") != digest
        }
        used = sum(sizes.values())
        if used + adding <= self.max_bytes:
            return
        kept = [d for d in sizes if self.used(d)]
        evictable = sorted((d for d in sizes if d not in kept), key=self.last_used)
        if used - sum(sizes[d] for d in evictable) + adding > self.max_bytes:
            raise StoreError(
                f"the store would grow to {(used + adding) / 1e6:.1f} MB, over its cap of "
                f"{self.max_bytes / 1e6:.1f} MB, and the images running tasks use "
                f"({', '.join(d[:19] for d in kept) or 'none'}) leave too little to evict"
            )
        for victim in evictable:
            if used + adding <= self.max_bytes:
                break
            if not self._evict(victim):
                kept.append(victim)
                continue
            used -= sizes[victim]
            if progress:
                progress(
                    f"evicted {victim[:19]} ({sizes[victim] / 1e6:.1f} MB, least recently "
                    "used) to stay under the store's cap"
                )
        if used + adding > self.max_bytes:
            raise StoreError(
                f"the store would grow to {(used + adding) / 1e6:.1f} MB, over its cap of "
                f"{self.max_bytes / 1e6:.1f} MB; the images in use or held "
                f"({', '.join(d[:19] for d in kept)}) cannot be evicted"
            )

    def _set_ref(
        self, ref: str, digest: str, private: bool = False, own: dict[str, Any] | None = None
    ) -> None:
        record: dict[str, Any] = {"ref": ref, "digest": digest, **(own or {})}
        if private:
            record["private"] = True
        write_atomic(os.path.join(self._dir("refs"), _key(ref) + ".json"), json.dumps(record))

    def tag(self, digest: str, ref: str) -> None:
        """Name digest also ref (root, by hand): the name takes the image as it is now."""
        image = self.lookup(digest)
        own = {k: image.meta[k] for k in REF_FIELDS if image and k in image.meta}
        name = str(reference.parse(ref)) if not ref.startswith("sha256:") else ref
        self._set_ref(name, digest, own={**own, "image_config": own.get("image_config", {})})

    # ---- removal -----------------------------------------------------------------------------

    def remove(self, text: str, in_use: InUse | None = None) -> list[str]:
        """Drop a reference (or, given a digest or a prefix of one, every reference of it);
        delete the image when nothing refers to it and no task uses it. Returns what was
        deleted."""
        found = self.resolve(text)
        by_digest = self.digest_form(text)
        named = "" if by_digest else str(reference.parse(text))
        for ref, digest in self.references().items():
            if digest == found.digest and (by_digest or ref == named):
                self._unlink_ref(ref)
        if found.digest in self.references().values():
            return []
        if (in_use and in_use(found.digest)) or self.used(found.digest):
            raise StoreError(
                f"image {found.digest} is in use by a running task; reference removed, image kept"
            )
        return self._delete(found.digest)

    def _evict(self, digest: str, unused_since: float | None = None) -> bool:
        """Delete an image with its references unless a task uses it, an import or a start
        holds it, or (with unused_since) it was used after that time. Whether it went."""
        with self._flock(digest.partition(":")[2] + ".hold", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
            if not free or self.used(digest):
                return False
            if unused_since is not None and self.last_used(digest) > unused_since:
                return False
            self._drop_refs(digest)
            self._delete(digest)
            return True

    def collect(self, min_age: float) -> list[str]:
        """The periodic GC (image_gc_interval): delete every image no task has used for
        min_age seconds, never one in use or held. Returns what was deleted."""
        cutoff = time.time() - min_age
        return [
            image.digest
            for image in sorted(self.images(), key=lambda i: self.last_used(i.digest))
            if self.last_used(image.digest) <= cutoff and self._evict(image.digest, cutoff)
        ]

    def prune(self, in_use: InUse | None = None, everything: bool = False) -> list[str]:
        """Delete images no reference names (all unused ones with everything=True), never one a
        running task uses or a start holds; clear abandoned temporary imports."""
        refs = self.references()
        deleted: list[str] = []
        for image in self.images():
            if (in_use and in_use(image.digest)) or self.used(image.digest):
                continue
            if not everything and image.digest in refs.values():
                continue
            if self._evict(image.digest):
                deleted.append(image.digest)
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp) if os.path.isdir(tmp) else []:
            path = os.path.join(tmp, name)
            if time.time() - os.path.getmtime(path) > 3600:  # an import killed long ago
                shutil.rmtree(path, ignore_errors=True)
        return deleted

    def _unlink_ref(self, ref: str) -> None:
        try:
            os.unlink(os.path.join(self.root, "refs", _key(ref) + ".json"))
        except FileNotFoundError:
            pass

    def _drop_refs(self, digest: str) -> None:
        for ref, named in self.references().items():
            if named == digest:
                self._unlink_ref(ref)

    def _delete(self, digest: str) -> list[str]:
        """The image and its metadata. Its signature stays: the same bytes imported again are
        the image that was signed."""
        for path in (self._meta_path(digest), self.image_path(digest)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return [digest]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def _normal(ref: str) -> str:
    """A reference as the store keys it (parsed and written back), else as given."""
    try:
        return str(reference.parse(ref))
    except reference.ReferenceError:
        return ref
