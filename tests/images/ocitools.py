"""Test helpers: layers and OCI image layouts written from Python descriptions, the way an
image builder would write them (hostile ones included). Writing tar is fine; reading them is
the code under test."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

# (name, kind, extra): kind "file" (extra: bytes or (bytes, mode)), "dir" (extra: mode),
# "symlink"/"hardlink" (extra: target), "fifo", "chr" (device), "raw" (extra: TarInfo fields)
Entry = tuple[str, str, Any]


def layer_tar(entries: list[Entry], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            data = None
            if kind == "file":
                content, mode = extra if isinstance(extra, tuple) else (extra, 0o644)
                info.size, info.mode, data = len(content), mode, io.BytesIO(content)
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, extra or 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            elif kind == "fifo":
                info.type, info.mode = tarfile.FIFOTYPE, 0o644
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "xattr":
                content, attrs = extra
                info.size, data = len(content), io.BytesIO(content)
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in attrs.items()}
            tar.addfile(info, data)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_layout(
    root: Path,
    layers: list[bytes],
    config: dict[str, Any] | None = None,
    tag: str = "latest",
    diff_ids: list[str] | None = None,
) -> Path:
    """An OCI image layout at root with one manifest tagged `tag` (its config's diff_ids
    computed, unless given)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return digest

    if diff_ids is None:
        diff_ids = [
            sha(gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer) for layer in layers
        ]
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": (config or {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i + 1}"} for i in range(len(layers))],
    }
    cfg_bytes = json.dumps(cfg).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(cfg_bytes),
            "size": len(cfg_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"
                if layer[:2] == b"\x1f\x8b"
                else "application/vnd.oci.image.layer.v1.tar",
                "digest": put(layer),
                "size": len(layer),
            }
            for layer in layers
        ],
    }
    man_bytes = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": put(man_bytes),
                "size": len(man_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under root with what an image must preserve; hard links as shared groups."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            kind = (
                "link"
                if path.is_symlink()
                else "dir"
                if path.is_dir()
                else "fifo"
                if path.is_fifo()
                else "file"
            )
            detail: Any = ""
            if kind == "link":
                detail = os.readlink(path)
            elif kind == "file":
                detail = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
                if st.st_nlink > 1:
                    detail += " linked-with " + inodes.setdefault(st.st_ino, rel)
            out[rel] = (
                kind,
                oct(st.st_mode & 0o7777) if kind != "link" else "",
                st.st_uid,
                st.st_gid,
                detail,
            )
    return out


def umoci_unpack(layout: Path, dest: Path, tag: str = "latest") -> Path:
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)],
        check=True,
        capture_output=True,
    )
    return dest / "rootfs"


def layout_from_dir(rootfs: Path, dest: Path, config: dict[str, Any], tag: str) -> Path:
    """One-layer OCI layout of a directory tree (as `docker build` of `COPY . /` would)."""
    raw = subprocess.run(
        ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], check=True, capture_output=True
    ).stdout
    return write_layout(dest, [gzip.compress(raw, mtime=0)], config, tag=tag)


def skopeo_push(layout: Path, tag: str, dest: str) -> None:
    """Push with a third-party tool, so our pull is tested against someone else's push."""
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", dest],
        check=True,
        capture_output=True,
    )
