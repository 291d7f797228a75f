"""Signature verification cost: per task start with warm caches, and the full check of a 1 GB
image after it changed (bounded by SHA-256). Starts its own Vault dev server (the test bed's
build) on a free loopback port.

    python bench/signing.py [--size-mb 1024] [--out bench/results/signing.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nomad_driver.signing.vault import Auth, Vault  # noqa: E402
from nomad_driver.signing.verify import Verifier, sign  # noqa: E402
from tests.vaultbed import TOKEN, dev_vault  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "signing.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, dev_vault() as (address, _):
        vault = Vault(address=address, auth=Auth(token=TOKEN))
        vault.setup("bench")
        image = Path(tmp) / "image.sqsh"
        with open(image, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        sign(vault, str(image), "bench", "bench")
        check = Verifier(vault, ("bench",), str(Path(tmp) / "cache"))
        start = time.perf_counter()
        check.verify(str(image), "bench")  # cold: hash the file, fetch the keys
        cold = time.perf_counter() - start
        warm = []
        for _ in range(200):
            start = time.perf_counter()
            check.verify(str(image), "bench")
            warm.append(time.perf_counter() - start)
        os.utime(image)  # changed as far as the cache can tell: everything is hashed again
        sign(vault, str(image), "bench", "bench")
        start = time.perf_counter()
        check.verify(str(image), "bench")
        rehash = time.perf_counter() - start
        start = time.perf_counter()  # the anchor: coreutils hashing the same file
        subprocess.run(["sha256sum", str(image)], check=True, capture_output=True)
        coreutils = time.perf_counter() - start
    gbps = args.size_mb / 1024 / rehash
    lines = [
        "# Signature verification cost",
        "",
        f"Measured by `python bench/signing.py --size-mb {args.size_mb}` on {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}, ed25519 key in a local Vault dev server.",
        "",
        "| check | time |",
        "|---|---|",
        f"| per start, warm caches (median of 200) | {statistics.median(warm) * 1e3:.3f} ms |",
        f"| per start, warm caches (p95) | {sorted(warm)[int(len(warm) * 0.95)] * 1e3:.3f} ms |",
        f"| first check: hash {args.size_mb} MB + fetch keys from Vault | {cold:.2f} s |",
        f"| after the image changed: hash again | {rehash:.2f} s ({gbps:.2f} GB/s) |",
        f"| anchor: `sha256sum` of the same file | {coreutils:.2f} s "
        f"(pyhpc's re-check {rehash / coreutils:.2f}x) |",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    result = {
        "warm_median_ms": statistics.median(warm) * 1e3,
        "warm_p95_ms": sorted(warm)[int(len(warm) * 0.95)] * 1e3,
        "cold_s": cold,
        "rehash_s": rehash,
        "sha256sum_s": coreutils,
        "size_mb": args.size_mb,
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(result))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
