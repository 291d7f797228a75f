"""The documentation: the README stays a short start, the reference tables are generated and
fail when they drift from the code, and no link leads nowhere."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "reference.md"
DOCS = [
    REPO / "README.md",
    REPO / "SECURITY.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "bench" / "results" / "README.md",
]


def generator() -> ModuleType:
    """scripts/readme-options.py, which writes the generated parts of docs/reference.md."""
    spec = importlib.util.spec_from_file_location(
        "readme_options", REPO / "scripts" / "readme-options.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(marker: str) -> str:
    text = REFERENCE.read_text()
    return text.split(f"<!-- {marker}:begin -->")[1].split(f"<!-- {marker}:end -->")[0].strip()


def test_reference_option_tables_match_the_declarations() -> None:
    ref = subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "config-reference"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert "pyhpc-gpu" in ref and "`cdi_spec_dirs`" in ref  # the device plugin's table too
    assert section("options") == ref, (
        "docs/reference.md options are stale: run scripts/readme-options.py"
    )


def test_reference_command_line_matches_the_parsers() -> None:
    cli = generator().cli_reference()
    for command in (
        "pyhpc run",
        "pyhpc image import",
        "pyhpc image rm",
        "pyhpc dispatch",
        "pyhpc job sync",
    ):
        assert f"### `{command}`" in cli
    assert section("cli") == cli, (
        "docs/reference.md command line is stale: run scripts/readme-options.py"
    )


def test_a_stale_table_is_found(tmp_path: Path) -> None:
    gen = generator()
    text = REFERENCE.read_text()
    for marker, body in gen.sections().items():
        stale = gen.replace(text, marker, body.replace("| `", "| `x", 1))
        assert gen.current(stale, marker) != body
        assert gen.current(gen.replace(stale, marker, body), marker) == body


def test_readme_starts_with_the_two_commands_ci_uses() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("scripts/demo.sh")
    assert block[1].startswith("scripts/test.sh")
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_readme_fits_on_a_few_screens() -> None:
    size = len((REPO / "README.md").read_bytes())
    assert size <= 12 * 1024, f"README.md is {size} bytes: move detail into docs/"
    readme = (REPO / "README.md").read_text()
    for doc in ("docs/admin.md", "docs/user.md", "docs/reference.md", "docs/design.md"):
        assert f"]({doc})" in readme, f"the README does not link {doc}"
    assert "](docs/development.md)" in readme and "](SECURITY.md)" in readme


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("install-plugin", "jobspec", "config-reference"):
        assert command in out


def prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a file's headings: lowercased, punctuation dropped, spaces
    to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_link_in_the_docs_resolves() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc)):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(REPO)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading makes #{anchor}")
    assert not broken, "\n".join(broken)


def test_the_example_plugin_configs_name_every_option() -> None:
    from nomad_driver.device.service import DeviceConfig
    from nomad_driver.driver.config import PluginConfig
    from nomad_driver.wire import schema

    for cls, example in ((PluginConfig, "pyhpc.hcl"), (DeviceConfig, "pyhpc-gpu.hcl")):
        text = (REPO / "plugin-config" / example).read_text()
        missing = [
            name
            for name, _ in schema.options(cls)
            if not re.search(rf"^\s*(# )?{name}\s*(=|{{)", text, flags=re.M)
        ]
        assert not missing, f"plugin-config/{example} does not show {missing}"


def test_the_readmes_first_job_is_jobspecs_hello() -> None:
    readme = (REPO / "README.md").read_text()
    first_job = readme.split("## A first job", 1)[1]
    shown = first_job.split("```hcl\n", 1)[1].split("```", 1)[0].strip()
    lines = (REPO / "jobspecs" / "hello.nomad").read_text().splitlines()
    assert shown == "\n".join(line for line in lines if not line.startswith("#")).strip()
