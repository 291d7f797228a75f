"""The command line runs images where the default policy allows them, as a user's would."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEM_IMAGES = Path("/var/lib/pyhpc/images")


@pytest.fixture(scope="session")
def busybox_image(busybox_image: Path) -> Iterator[Path]:
    """The shared busybox image, installed in the default image_dirs (root-owned, 0644)."""
    SYSTEM_IMAGES.mkdir(parents=True, exist_ok=True)
    target = SYSTEM_IMAGES / f"test-busybox-{os.getpid()}.sqsh"
    shutil.copyfile(busybox_image, target)
    os.chmod(target, 0o644)
    yield target
    target.unlink(missing_ok=True)
