"""The code passes the project's own checks: ruff (lint and format) and strict mypy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ["nomad_driver", "bench", "tests"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_ruff_finds_nothing() -> None:
    lint = run("ruff", "check", *PATHS)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run("ruff", "format", "--check", *PATHS)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict_finds_nothing() -> None:
    typed = run("mypy", "nomad_driver", "bench", "tests/federation")
    assert typed.returncode == 0, typed.stdout + typed.stderr


def test_starting_from_a_stored_image_loads_no_http_stack() -> None:
    """`pyhpc run` and every task start import the store; only an import needs requests."""
    probe = (
        "import sys, nomad_driver.images.store, nomad_driver.cli.run; "
        "print('requests' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
