"""Where images come from: each transport yields the manifest, the config and the layer blobs
(or a finished SquashFS), with every digest checked against what referenced it."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from nomad_driver.images.merge import Layer
from nomad_driver.images.reference import Reference
from nomad_driver.images.registry import INDEX_TYPES, Registry, RegistryError, select_platform

SQUASHFS_ARTIFACT = "application/vnd.pyhpc.squashfs.v1"
SQUASHFS_CONFIG = "application/vnd.pyhpc.image.config.v1+json"
SIGNATURE_ARTIFACT = "application/vnd.dsse.envelope.v1+json"
Progress = Callable[[str], None]


class SourceError(RuntimeError):
    """The source is missing, malformed or does not match its digests."""


@dataclass
class Fetched:
    """An image ready to become a SquashFS: layers to merge, or a SquashFS file, or a tree."""

    config: dict[str, Any] = field(default_factory=dict)  # the OCI image config
    manifest_digest: str = ""
    config_digest: str = ""
    layers: list[Layer] = field(default_factory=list)
    squashfs: str = ""  # a finished image (file:, oras://)
    directory: str = ""  # dir:
    signature: str = ""  # a DSSE envelope that came with the image (oras://)
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
    if not isinstance(digest, str):
        raise SourceError(f"malformed digest {digest!r} (sha256:<64 hex> expected)")
    algorithm, _, hexpart = digest.partition(":")
    if (
        algorithm != "sha256"
        or len(hexpart) != 64
        or not all(c in "0123456789abcdef" for c in hexpart)
    ):
        raise SourceError(f"unsupported or malformed digest {digest!r} (sha256 only)")
    return f"blobs/sha256/{hexpart}"


class _Layout:
    """An OCI image layout, in a directory or a tar file: read(path) -> bytes, open(path)."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self.tar: tarfile.TarFile | None = None
        if ref.transport == "oci-archive":
            try:
                self.tar = tarfile.open(ref.path)
            except (OSError, tarfile.TarError) as err:
                raise SourceError(f"{ref}: cannot read the archive ({err})") from err
            self.members = {m.name.lstrip("./"): m for m in self.tar.getmembers() if m.isreg()}
        elif not os.path.isdir(ref.path):
            raise SourceError(f"{ref}: no such directory")

    def open(self, name: str) -> IO[bytes]:
        if self.tar is not None:
            member = self.members.get(name)
            stream = self.tar.extractfile(member) if member else None
            if stream is None:
                raise SourceError(f"{self.ref}: {name} is missing from the archive")
            return stream
        path = os.path.join(self.ref.path, name)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except OSError as err:
            raise SourceError(f"{self.ref}: {name}: {err.strerror}") from err

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


def _opener(open_blob: Callable[[str], IO[bytes]], name: str) -> Callable[[], IO[bytes]]:
    return lambda: open_blob(name)


def _from_layout(ref: Reference) -> Fetched:
    layout = _Layout(ref)
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
    layers = []
    for i, d in enumerate(descriptors):
        name = _blob_name(d["digest"])
        layers.append(
            Layer(
                f"layer {i + 1} {d['digest'][:19]}",
                _opener(open_blob, name),
                digest=d["digest"],
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


def _from_docker_archive(ref: Reference) -> Fetched:
    try:
        archive = tarfile.open(ref.path)
    except (OSError, tarfile.TarError) as err:
        raise SourceError(f"{ref}: cannot read the archive ({err})") from err
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
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(entry["Layers"]):
        raise SourceError(f"{ref}: {len(entry['Layers'])} layers but {len(diff_ids)} diff_ids")
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
    manifest = _json(body, f"{where}: manifest")
    if media in INDEX_TYPES or "manifests" in manifest:
        digest = select_platform(manifest, where)
        body, media, digest = registry.manifest(ref.repository, digest)
        manifest = _json(body, f"{where}: manifest")
    if ref.transport == "oras":
        return _oras(ref, manifest, digest, workdir, registry, progress)

    def read(name: str) -> bytes:
        return registry_blob_bytes(registry, ref.repository, "sha256:" + name[-64:], workdir)

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
    return image


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
        raise SourceError(f"{ref}: not a pyhpc SquashFS artifact (no {SQUASHFS_ARTIFACT} layer)")
    path = os.path.join(workdir, "image.sqsh")
    registry.blob(ref.repository, layers[0]["digest"], path)
    if progress:
        progress(f"downloaded {layers[0]['digest'][:19]}")
    config = _json(
        registry_blob_bytes(registry, ref.repository, manifest["config"]["digest"], workdir),
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
        provenance={"source": str(ref), "manifest": manifest, **config.get("provenance", {})},
    )


def registry_blob_bytes(registry: Registry, repository: str, digest: str, workdir: str) -> bytes:
    path = os.path.join(workdir, digest.replace(":", "-"))
    registry.blob(repository, digest, path)
    with open(path, "rb") as f:
        return f.read()


def fetch(
    ref: Reference, workdir: str, progress: Progress | None = None, registry: Registry | None = None
) -> Fetched:
    """Everything needed to build ref's SquashFS; downloads go into workdir."""
    try:
        if ref.transport in ("oci", "oci-archive"):
            return _from_layout(ref)
        if ref.transport == "docker-archive":
            return _from_docker_archive(ref)
        if ref.transport == "dir":
            if not os.path.isdir(ref.path):
                raise SourceError(f"{ref}: no such directory")
            return Fetched(directory=ref.path, provenance={"source": str(ref)})
        if ref.transport == "file":
            if not os.path.isfile(ref.path):
                raise SourceError(f"{ref}: no such file")
            return Fetched(squashfs=ref.path, provenance={"source": str(ref)})
        return _from_registry(ref, workdir, registry or Registry(ref.registry), progress)
    except RegistryError as err:
        raise SourceError(str(err)) from err
    except (KeyError, TypeError, ValueError) as err:
        raise SourceError(f"{ref}: malformed image metadata ({err})") from err
