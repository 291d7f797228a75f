"""Write the seed corpus (valid and nearly valid inputs for each target)."""

from __future__ import annotations

import json
from pathlib import Path

from nomad_driver.wire import cty
from tests.fuzz.targets import TASK_TYPE
from tests.images.ocitools import layer_tar
from tests.images.test_merge import BASE, EDGE_LAYERS, TOP, UPPER

CORPUS = Path(__file__).resolve().parent / "corpus"


def main() -> None:
    seeds: dict[str, list[bytes]] = {
        "cty_decode": [
            cty.encode(v, cty.parse_type(t))
            for v, t in (
                ("x", "string"),
                (3.5, "number"),
                (True, "bool"),
                (["a", "b"], "list(string)"),
                ({"k": 1}, "map(number)"),
                ({"a": "s", "b": [1, 2]}, "object({a = string, b = list(number)})"),
            )
        ],
        "task_config": [
            cty.encode({"image": "/i.sqsh", "command": "/bin/sh", "args": ["-c", "x"]}, TASK_TYPE),
            cty.encode(
                {
                    "image": "docker://127.0.0.1:5000/a/b:1",
                    "mounts": ["/scratch:/data:ro"],
                    "cap_add": ["NET_ADMIN"],
                    "seccomp": "/p.json",
                },
                TASK_TYPE,
            ),
        ],
        "task_config_values": [],
        "image_reference": [
            s.encode()
            for s in (
                "docker://127.0.0.1:5000/team/app:1.0",
                "oras://r.example:5000/a@sha256:" + "a" * 64,
                "oci:/layout:tag",
                "oci-archive:/x.tar",
                "docker-archive:/y.tar",
                "dir:/rootfs",
                "/i.sqsh",
            )
        ],
        "oci_manifest": [
            json.dumps(
                {
                    "schemaVersion": 2,
                    "config": {"digest": "sha256:" + "0" * 64},
                    "layers": [{"digest": "sha256:" + "1" * 64, "size": 3}],
                }
            ).encode()
        ],
        "layer_merge": [layer_tar(BASE), layer_tar(UPPER, compress=False), layer_tar(TOP)]
        + [layer_tar(layer, compress=False) for layer in EDGE_LAYERS],
    }
    import msgpack

    seeds["task_config_values"] = [
        msgpack.packb({"image": "/i", "command": "c", "args": ["a"]}),
        msgpack.packb({"image": 5, "writable": ["x"]}),
    ]
    for name, items in seeds.items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(items):
            (folder / f"seed-{i}").write_bytes(data)


if __name__ == "__main__":
    main()
