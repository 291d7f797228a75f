"""Image import: pyhpc against the anchors, one run, from a loopback registry.

Builds a six-layer image of about 1.5 GB from directories of this machine, pushes it with
skopeo to a throwaway docker-registry on 127.0.0.1, then times, each into a fresh directory:

  pyhpc       `pyhpc image import docker://...` (two-pass streaming merge into tar2sqfs)
  enroot way  download (skopeo), unpack every layer (umoci), `mksquashfs` with its defaults
  ch-image    `ch-image pull` then `ch-convert` to SquashFS (Charliecloud), when installed
  tar2sqfs    `tar2sqfs -j N -c zstd -X level=3` on the already flattened tree, alone
  bound       the pipeline bound: that tree gzip'd as the layers are, decoded by ISA-L
              (python-isal's igzip) straight into the same tar2sqfs, on the same cores

and records wall time, peak RSS of the whole process tree, and peak extra disk. Needs root.

    python bench/import_speed.py [--out bench/results/images.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.images.ocitools import write_layout  # noqa: E402
from tests.registry import run_registry  # noqa: E402

BUSYBOX = "bin/busybox"  # Debian's static busybox, on top: something to start in the image
LAYER_DIRS = [
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/gcc",
    "usr/lib/python3.11",
    "usr/bin",
    "usr/include",
]
JOBS = str(len(os.sched_getaffinity(0)))


def disk_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def measure(
    argv_list: list[list[str]], work: Path, env: dict[str, str] | None = None
) -> tuple[float, float, float]:
    """Run the commands in sequence: (seconds, peak RSS MB of any process, peak extra disk MB)."""
    base, peak, stop = disk_used(work), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], disk_used(work) - base)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rss = 0.0
    start = time.perf_counter()
    try:
        for argv in argv_list:
            # GNU time: the largest RSS of the command and every process it waited for.
            with tempfile.NamedTemporaryFile("r") as report:
                subprocess.run(
                    ["/usr/bin/time", "-f", "%M", "-o", report.name, *argv],
                    check=True,
                    capture_output=True,
                    env={**os.environ, **(env or {})},
                )
                rss = max(rss, float(report.read().split()[-1]) / 1024)
    finally:
        elapsed = time.perf_counter() - start
        stop.set()
        sampler.join()
    return elapsed, rss, peak[0] / 1e6


def build_image(work: Path) -> tuple[Path, int]:
    layers = []
    total = 0
    for d in [*LAYER_DIRS, BUSYBOX]:
        raw = subprocess.run(
            ["tar", "-C", "/", "-ch" if d == BUSYBOX else "-c", d], check=True, capture_output=True
        ).stdout
        total += len(raw)
        zipped = subprocess.run(
            ["gzip", "-6", "-n"], input=raw, check=True, capture_output=True
        ).stdout
        layers.append(zipped)
        print(f"layer {d}: {len(raw) / 1e6:.0f} MB, gzip {len(zipped) / 1e6:.0f} MB", flush=True)
    return write_layout(work / "layout", layers, {"Cmd": ["/bin/sh"]}, tag="1"), total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "images.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("import_speed: needs root")
    work = Path(tempfile.mkdtemp(prefix="pyhpc-import-bench-", dir="/var/tmp"))
    rows: list[tuple[str, float, float, float, str]] = []
    try:
        layout, tree_bytes = build_image(work)
        # TLS: ch-image speaks nothing else. Every tool trusts the throwaway CA.
        with run_registry(work / "registry", tls=True) as reg:
            ref = f"{reg.host}/bench/big:1"
            certs = work / "certs"
            certs.mkdir()
            shutil.copy(reg.ca_file, certs / "ca.crt")
            subprocess.run(
                [
                    "skopeo",
                    "copy",
                    "--quiet",
                    f"--dest-cert-dir={certs}",
                    f"oci:{layout}:1",
                    f"docker://{ref}",
                ],
                check=True,
            )
            shutil.rmtree(layout)
            pyhpc = work / "pyhpc"
            t, rss, disk = measure(
                [
                    [
                        sys.executable,
                        "-m",
                        "nomad_driver.cli.main",
                        "image",
                        "--store",
                        str(pyhpc),
                        "--registry-ca",
                        reg.ca_file,
                        "import",
                        f"docker://{ref}",
                    ]
                ],
                work,
            )
            size = sum(p.stat().st_size for p in (pyhpc / "sha256").iterdir()) / 1e6
            rows.append(("pyhpc image import", t, rss, disk, f"image {size:.0f} MB (zstd 3)"))

            enroot = work / "enroot"
            enroot.mkdir()
            t, rss, disk = measure(
                [
                    [
                        "skopeo",
                        "copy",
                        "--quiet",
                        f"--src-cert-dir={certs}",
                        f"docker://{ref}",
                        f"oci:{enroot / 'layout'}:1",
                    ],
                    [
                        "umoci",
                        "unpack",
                        "--image",
                        f"{enroot / 'layout'}:1",
                        str(enroot / "bundle"),
                    ],
                    [
                        "mksquashfs",
                        str(enroot / "bundle" / "rootfs"),
                        str(enroot / "image.sqsh"),
                        "-noappend",
                        "-quiet",
                        "-no-progress",
                    ],
                ],
                work,
            )
            size = (enroot / "image.sqsh").stat().st_size / 1e6
            rows.append(
                (
                    "enroot way: download, unpack, mksquashfs defaults",
                    t,
                    rss,
                    disk,
                    f"image {size:.0f} MB (mksquashfs default gzip)",
                )
            )

            flat = work / "flat.tar"
            subprocess.run(
                ["tar", "-C", str(enroot / "bundle" / "rootfs"), "-cf", str(flat), "."], check=True
            )
            shutil.rmtree(enroot)
            out = work / "bound.sqsh"
            tar2sqfs = ["tar2sqfs", "-q", "-f", "-j", JOBS, "-c", "zstd", "-X", "level=3", str(out)]
            with open(flat, "rb") as stdin:
                start = time.perf_counter()
                subprocess.run(tar2sqfs, stdin=stdin, check=True)
                alone = time.perf_counter() - start
            rows.append(
                (
                    f"tar2sqfs -j {JOBS} alone on the flattened tar",
                    alone,
                    0.0,
                    0.0,
                    f"image {out.stat().st_size / 1e6:.0f} MB",
                )
            )
            # The pipeline bound: the same tree gzip'd as the layers are, decoded by the
            # fastest decoder here (ISA-L) into tar2sqfs on the same cores, as pyhpc must.
            zipped = work / "flat.tar.gz"
            with open(flat, "rb") as src, open(zipped, "wb") as dst:
                subprocess.run(["gzip", "-6", "-n"], stdin=src, stdout=dst, check=True)
            out.unlink()
            decode = f"{sys.executable} -m isal.igzip -d -c {zipped}"
            start = time.perf_counter()
            subprocess.run(["bash", "-c", f"set -o pipefail; {decode} | {' '.join(tar2sqfs)}"],
                           check=True)  # fmt: skip
            bound = time.perf_counter() - start
            rows.append(
                (
                    f"pipeline bound: ISA-L gunzip into tar2sqfs -j {JOBS}",
                    bound,
                    0.0,
                    0.0,
                    f"image {out.stat().st_size / 1e6:.0f} MB",
                )
            )
            zipped.unlink()
            flat.unlink()
            out.unlink()

            if shutil.which("ch-image") and shutil.which("ch-convert"):
                ch = work / "ch"
                try:
                    t, rss, disk = measure(
                        [
                            ["ch-image", "--tls-no-verify", "pull", ref],
                            [
                                "ch-convert",
                                "-i",
                                "ch-image",
                                "-o",
                                "squash",
                                ref,
                                str(work / "ch.sqfs"),
                            ],
                        ],
                        work,
                        # its --tls-no-verify loses to REQUESTS_CA_BUNDLE: trust our CA instead
                        {
                            "USER": "root",
                            "REQUESTS_CA_BUNDLE": reg.ca_file,
                            "CH_IMAGE_STORAGE": str(ch),
                        },
                    )
                    size = (work / "ch.sqfs").stat().st_size / 1e6
                    rows.append(
                        (
                            "ch-image pull + ch-convert",
                            t,
                            rss,
                            disk,
                            f"image {size:.0f} MB (mksquashfs -b 65536 defaults)",
                        )
                    )
                except subprocess.CalledProcessError as err:
                    why = " ".join((err.stderr or b"").decode()[-300:].split())
                    rows.append(("ch-image pull + ch-convert", 0.0, 0.0, 0.0, f"failed: {why}"))
            else:
                rows.append(
                    (
                        "ch-image pull + ch-convert",
                        0.0,
                        0.0,
                        0.0,
                        "not installed (apt install charliecloud-builders)",
                    )
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours = rows[0][1]
    lines = [
        f"# Image import: a {len(LAYER_DIRS) + 1}-layer image from a loopback registry",
        "",
        f"Measured by `python bench/import_speed.py` on {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}; all rows in one run. The image: {len(LAYER_DIRS) + 1} gzip "
        f"layers, of this machine's {', '.join('/' + d for d in LAYER_DIRS)} and a static "
        "busybox, "
        f"{tree_bytes / 1e6:.0f} MB of tar. Ratio: the row's time over pyhpc's.",
        "",
        "| method | seconds | ratio to pyhpc | peak RSS (MB) | peak extra disk (MB) | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, t, rss, disk, note in rows:
        if t:
            lines.append(f"| {name} | {t:.1f} | {t / ours:.2f} | {rss:.0f} | {disk:.0f} | {note} |")
        else:
            lines.append(f"| {name} | - | - | - | - | {note} |")
    bound = next(r[1] for r in rows if r[0].startswith("pipeline bound"))
    lines += [
        "",
        f"pyhpc over the pipeline bound: **{ours / bound:.2f}x** (target: at most 1.3x).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
