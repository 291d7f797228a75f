"""Structured fuzz input: tar layers built from hostile names, types and link targets, which
random bytes would almost never reach."""

from __future__ import annotations

import io
import tarfile

from hypothesis import strategies as st

NAMES = st.sampled_from(
    [
        "a",
        "a/b",
        "a/b/c",
        "..",
        "../x",
        "a/../../x",
        "/abs",
        "./a",
        ".wh.a",
        "a/.wh..wh..opq",
        ".wh..wh..opq",
        ".wh.",
        "a/.wh..",
        ".",
        "./",
        "a//b",
        "\u00e9",
        "a" * 300,
        "dev/null",
    ]
)
TYPES = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        b"Z",
    ]
)


@st.composite
def tar_layers(draw: st.DrawFn) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for _ in range(draw(st.integers(0, 12))):
            info = tarfile.TarInfo(draw(NAMES))
            info.type = draw(TYPES)
            info.linkname = draw(NAMES)
            info.mode = draw(st.integers(0, 0o7777))
            data = draw(st.binary(max_size=64)) if info.type == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()
