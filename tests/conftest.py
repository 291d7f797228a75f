"""Fixtures shared by every test folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SquashFS image with busybox, built the way the demo image is."""
    out = tmp_path_factory.mktemp("images") / "busybox.sqsh"
    subprocess.run(
        [str(REPO / "scripts" / "make-demo-image.sh"), str(out)], check=True, capture_output=True
    )
    return out
