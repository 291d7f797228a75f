"""The README's option tables are generated; fail when they drift from the declarations."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_option_tables_match_the_declarations() -> None:
    ref = subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "config-reference"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- options:begin -->")[1].split("<!-- options:end -->")[0]
    assert section.strip() == ref, "README options are stale: paste `pyhpc config-reference`"


def test_readme_starts_with_the_two_commands_ci_uses() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("scripts/demo.sh")
    assert block[1].startswith("scripts/test.sh")
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("install-plugin", "jobspec", "config-reference"):
        assert command in out
