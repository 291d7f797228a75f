"""Image digests are hashed once and re-hashed only when the file provably changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from nomad_driver.util import digest


def test_digest_is_cached_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"a" * 3000)
    cache = str(tmp_path / "cache")
    reads: list[str] = []
    real = digest.sha256_fd
    monkeypatch.setattr(digest, "sha256_fd", lambda fd: reads.append(str(fd)) or real(fd))

    first = digest.file_digest(str(image), cache)
    assert first == "sha256:" + hashlib.sha256(b"a" * 3000).hexdigest()
    assert digest.file_digest(str(image), cache) == first
    assert len(reads) == 1  # the second answer came from the cache

    # Same size, mtime put back: ctime still moves, so the change is seen.
    st = image.stat()
    image.write_bytes(b"b" * 3000)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (
        digest.file_digest(str(image), cache) == "sha256:" + hashlib.sha256(b"b" * 3000).hexdigest()
    )
    assert len(reads) == 2


def test_a_corrupt_cache_entry_is_ignored(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"x")
    cache = tmp_path / "cache"
    good = digest.file_digest(str(image), str(cache))
    for entry in cache.iterdir():
        entry.write_bytes(b"\xff garbage")
    assert digest.file_digest(str(image), str(cache)) == good
