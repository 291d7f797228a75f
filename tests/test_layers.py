"""The architecture, enforced: each layer imports only the layers below it, and the runtime,
images, signing and federation know nothing of gRPC, protobuf or Nomad's plugin protocol.
Every import counts, at module level or inside a function.

    util        leaf helpers (files, digests, durations)
    runtime     namespaces, mounts, cgroups, the supervisor          -> util
    images      the store, imports, registries                       -> runtime, util
    signing     envelopes, Vault, verification                       -> images, runtime, util
    federation  Nomad's HTTP API: dispatch, job sync                 -> util
    proto, wire, goplugin   Nomad's plugin protocol                  -> proto, wire, util
    device      the pyhpc-gpu device plugin                          -> protocol layers, util
    driver      the task driver: Nomad's protocol onto the layers    -> all of the above
    cli         the `pyhpc` command                                  -> anything
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nomad_driver"
PROTOCOL = {"proto", "wire", "goplugin"}
ALLOWED: dict[str, set[str]] = {
    "util": set(),
    "runtime": {"util"},
    "images": {"runtime", "util"},
    "signing": {"images", "runtime", "util"},
    "federation": {"util"},
    "proto": set(),
    "wire": {"proto", "util"},
    "goplugin": {"proto", "util"},
    "device": {*PROTOCOL, "util"},
    "driver": {*PROTOCOL, "util", "runtime", "images", "signing", "device", "federation"},
    "cli": {*PROTOCOL, "util", "runtime", "images", "signing", "device", "federation", "driver"},
}
NO_PROTOCOL = {"runtime", "images", "signing", "federation", "util"}
FOREIGN_PROTOCOL = ("grpc", "google.protobuf")


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            if node.module == "nomad_driver":
                found += [(node.lineno, f"nomad_driver.{a.name}") for a in node.names]
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in ALLOWED:
            continue
        layer = parts[0]
        for line, name in imports(path):
            where = f"{path.relative_to(root.parent)}:{line}: {layer} imports {name}"
            if layer in NO_PROTOCOL and name.startswith(FOREIGN_PROTOCOL):
                wrong.append(where)
            pieces = name.split(".")
            if pieces[0] != "nomad_driver" or len(pieces) < 2 or pieces[1] == layer:
                continue
            if pieces[1] in ALLOWED and pieces[1] not in ALLOWED[layer]:
                wrong.append(where)
    return wrong


def test_each_layer_imports_only_the_layers_below_it() -> None:
    assert violations() == []


def test_the_contract_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The control: a runtime module that imports the driver, and one that imports grpc."""
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "bad.py").write_text(
        "import grpc\n\ndef f():\n    from nomad_driver.driver import policy\n"
    )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "fine.py").write_text("from nomad_driver.runtime import linux\n")
    found = violations(tmp_path)
    assert len(found) == 2 and all("runtime/bad.py" in v for v in found), found
