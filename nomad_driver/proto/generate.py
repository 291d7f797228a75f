"""Regenerate the protobuf and gRPC modules from the .proto files beside this file.

Run `python -m nomad_driver.proto.generate` from the repository root after editing a
.proto file. `generate(out_dir)` is also used by the test that fails when the
committed modules are stale.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent
PROTOS = sorted(p.name for p in PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto into out_dir (mirroring nomad_driver/proto/): the modules, their
    gRPC services and the messages' type stubs (.pyi); returns the files."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",  # typed messages for mypy
        *(f"nomad_driver/proto/{name}" for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_dir / "nomad_driver" / "proto").glob("*_pb2*.py*"))


def main() -> int:
    written = generate(REPO_ROOT)
    for path in written:
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
