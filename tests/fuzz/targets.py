"""Fuzz targets: hostile input to every parser that faces the outside, each of which must end
in its own error with a message, never a crash, a hang, or a write outside its directory.

Each target takes bytes. tests/fuzz/test_fuzz.py runs them briefly on every test run (with the
committed corpus); scripts/fuzz.sh runs them for as long as asked."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable

import msgpack

from nomad_driver.driver import config
from nomad_driver.images import merge, reference, sources
from nomad_driver.wire import cty, schema

TASK_TYPE = schema.object_type(config.TaskConfig)
TYPES = [
    cty.parse_type(t)
    for t in (
        "string",
        "number",
        "bool",
        "list(string)",
        "map(number)",
        "set(string)",
        "object({a = string, b = list(number)})",
        "tuple([string, bool])",
        "any",
    )
]


def cty_decode(data: bytes) -> None:
    for ty in TYPES:
        try:
            cty.decode(data, ty)
        except cty.CtyDecodeError as err:
            assert str(err)


def task_config(data: bytes) -> None:
    """Nomad's msgpack of a task config, as the driver decodes it."""
    try:
        schema.load(config.TaskConfig, data, "task config")
    except schema.ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)


def task_config_values(data: bytes) -> None:
    """Well-formed msgpack with arbitrary values, re-encoded as cty would carry them."""
    try:
        value = msgpack.unpackb(data, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not msgpack: nothing to try
        return
    if not isinstance(value, dict):
        return
    try:
        schema.load(config.TaskConfig, {str(k): v for k, v in value.items()}, "task config")
    except schema.ConfigError as err:
        assert err.problems


def image_reference(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    try:
        ref = reference.parse(text)
    except reference.ReferenceError as err:
        assert str(err)
        return
    assert reference.parse(str(ref)) == ref  # what we print parses back to the same


def oci_manifest(data: bytes) -> None:
    """A manifest and config as a registry or layout could serve them."""
    blobs: dict[str, bytes] = {}

    def read(name: str) -> bytes:
        return blobs.get(name[-64:], data)

    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = {"config": {"digest": "sha256:" + "0" * 64}, "layers": []}
    if not isinstance(manifest, dict):
        return
    try:
        sources._from_manifest(  # noqa: SLF001 - the parser under test
            reference.Reference("oci", path="/x"), manifest, "", read, lambda n: io.BytesIO(data)
        )
    except sources.SourceError as err:
        assert str(err)


def layer_merge(data: bytes) -> None:
    """A layer blob: raw bytes as a tar (or gzip/zstd) stream, merged into a tar in memory."""
    out = io.BytesIO()
    try:
        merge.merge([merge.Layer("layer 1", lambda: io.BytesIO(data))], out)
    except merge.LayerError as err:
        assert str(err).startswith("layer 1")
        return
    out.seek(0)
    for member in tarfile.open(fileobj=out):  # what we wrote is a tar with safe names only
        assert not member.name.startswith("/") and ".." not in member.name.split("/")
        assert not (member.ischr() or member.isblk())


TARGETS: dict[str, Callable[[bytes], None]] = {
    "cty_decode": cty_decode,
    "task_config": task_config,
    "task_config_values": task_config_values,
    "image_reference": image_reference,
    "oci_manifest": oci_manifest,
    "layer_merge": layer_merge,
}
