"""Pushing a stored SquashFS to an OCI registry as an artifact (ORAS style): a manifest whose
one layer is the SquashFS file and whose config carries the image config and provenance, so
`oras://` pulls give every node the finished image instead of a re-import."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

from nomad_driver.images import reference
from nomad_driver.images.registry import Registry
from nomad_driver.images.sources import (
    ARTIFACT_TYPE,
    SIGNATURE_ARTIFACT,
    SQUASHFS_ARTIFACT,
    SQUASHFS_CONFIG,
)
from nomad_driver.images.store import StoredImage

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def push(
    image: StoredImage,
    dest: str,
    progress: Callable[[str], None] | None = None,
    registry: Registry | None = None,
) -> str:
    """Upload image to dest (oras://HOST/REPO:TAG); returns "dest@manifest-digest"."""
    ref = reference.parse(dest)
    if ref.transport != "oras":
        raise ValueError(f"{dest}: push needs an oras:// reference")
    reg = registry or Registry(ref.registry)
    config = json.dumps(
        {
            "image_config": image.config,
            "provenance": {
                "imported_from": image.meta.get("source"),
                "manifest_digest": image.meta.get("manifest_digest"),
            },
        },
        sort_keys=True,
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    with tempfile.NamedTemporaryFile() as f:
        f.write(config)
        f.flush()
        reg.push_blob(ref.repository, f.name, config_digest)
    if progress:
        progress(f"uploading {image.digest[:19]} ({image.meta.get('size', 0) / 1e6:.1f} MB)")
    reg.push_blob(ref.repository, image.path, image.digest)
    layers = [
        {
            "mediaType": SQUASHFS_ARTIFACT,
            "digest": image.digest,
            "size": os.path.getsize(image.path),
        }
    ]
    signature = image.path + ".dsse.json"
    if os.path.exists(signature):  # the signature travels with the image
        with open(signature, "rb") as f:
            sig_digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        reg.push_blob(ref.repository, signature, sig_digest)
        layers.append(
            {
                "mediaType": SIGNATURE_ARTIFACT,
                "digest": sig_digest,
                "size": os.path.getsize(signature),
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": SQUASHFS_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": layers,
    }
    body = json.dumps(manifest, sort_keys=True).encode()
    digest = reg.push_manifest(ref.repository, ref.tag or "latest", body, MANIFEST_TYPE)
    return f"{ref}@{digest}"
