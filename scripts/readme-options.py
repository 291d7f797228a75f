#!/usr/bin/env python3
"""Paste `pyhpc config-reference` between the README's option markers (what test_readme checks)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ref = subprocess.run(
    [sys.executable, "-m", "nomad_driver.cli.main", "config-reference"],
    capture_output=True,
    text=True,
    check=True,
    cwd=REPO,
).stdout.strip()
readme = REPO / "README.md"
head, rest = readme.read_text().split("<!-- options:begin -->")
_, tail = rest.split("<!-- options:end -->")
readme.write_text(f"{head}<!-- options:begin -->\n{ref}\n<!-- options:end -->{tail}")
