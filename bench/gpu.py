"""GPU measures (issue: GPUs): the device plugin's fingerprint time and the extra start cost of
GPU injection, from the GPU check (scripts/gpu_check.py), which also checks that a container
given one GPU sees one and runs a CUDA kernel on it.

    python bench/gpu.py                      # on a machine with an NVIDIA GPU, as root
    python bench/gpu.py --from gpu.json      # render a record made elsewhere (gpu-check --json)

Writes bench/results/gpu.md and .json. Exits 77 without a GPU, as the check does, and leaves
the recorded results as they are. Target: injection under 20 ms per task.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def render(record: dict[str, Any], source: str) -> str:
    m = record["measures"]
    per_task = m["reservation_ms"] + m["mounting_ms"]
    rows = [
        ("NVML probe (start, count, attributes)", f"{m['nvml_probe_ms']:.0f} ms"),
        (
            "device plugin: first fingerprint after its start",
            f"{m['fingerprint_first_answer_ms']:.0f} ms",
        ),
        ("reservation (linker cache, tools), once per allocation", f"{m['reservation_ms']:.1f} ms"),
        (
            f"runtime binds {m['device_nodes']} device nodes + {m['read_only_mounts']} "
            "read-only mounts",
            f"{m['mounting_ms']:.1f} ms",
        ),
        ("**injection per task (target < 20 ms)**", f"**{per_task:.1f} ms**"),
        (
            f"`pyhpc run --gpus`: GPU lookup ({m['gpu_lookup_from']})",
            f"{m['gpu_lookup_ms']:.1f} ms",
        ),
        (
            "`pyhpc run /bin/true`, none / `--gpus 1` (medians, 25 interleaved pairs)",
            f"{m['run_plain_ms']:.0f} / {m['run_gpus1_ms']:.0f} ms",
        ),
        (
            "paired difference, median (quartiles)",
            f"{m['run_delta_median_ms']:+.1f} ms ({m['run_delta_q1_ms']:+.1f}, "
            f"{m['run_delta_q3_ms']:+.1f})",
        ),
    ]
    steps = "\n".join(f"- {s['status']}: {s['step']}" for s in record["steps"])
    return (
        "# GPU: fingerprint and injection cost\n\n"
        f"{m['gpu']}, driver {m['driver']}, CUDA {m['cuda']}, kernel {m['kernel']}. "
        f"Source: {source}.\n\n"
        "| measure | value |\n|---|---|\n"
        + "\n".join(f"| {a} | {b} |" for a, b in rows)
        + f"\n\nThe check's steps:\n\n{steps}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="record", metavar="JSON", help="a gpu-check --json record")
    parser.add_argument("--source", default="", help="where the record was made, for the report")
    args = parser.parse_args()
    if args.record:
        path = Path(args.record)
    else:
        path = Path(tempfile.mkdtemp()) / "gpu.json"
        done = subprocess.run([str(REPO / "scripts/gpu-check.sh"), "--json", str(path)])
        if done.returncode == 77:
            return 77
        if not path.exists():
            print("bench/gpu.py: the GPU check wrote no record", file=sys.stderr)
            return 1
    record = json.loads(path.read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "gpu.md").write_text(render(record, args.source or "this machine"))
    print((RESULTS / "gpu.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
