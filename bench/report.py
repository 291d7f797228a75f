"""Every benchmark of the project in one run, each side by side with its anchors, then one report:
bench/results/report.md (a table of ratios, the headline numbers) and PNG plots next to it.

    python bench/report.py            # the full sizes, the load suite short (about 20 minutes)
    python bench/report.py --quick    # smaller samples, same rows (about 13 minutes)
    python bench/report.py --soak     # ... and the full load: 200 at once, 1,000 in a row
    python bench/report.py --only dispatch,load   # run some, reuse the others' last results

Needs root, the test bed cluster up (scripts/testbed/cluster.sh up) for the Nomad benchmarks,
and the anchors installed (scripts/setup.sh installs them); a missing anchor is a row that says
so. Each benchmark also writes its own table (bench/results/<name>.md and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def benchmarks(quick: bool) -> dict[str, list[str]]:
    """name -> command; each writes RESULTS/<name>.json."""
    py = sys.executable
    out = {name: str(RESULTS / f"{name}.md") for name in ("foundation", "runtime", "images")}
    # Order: the Nomad benchmarks that need a calm agent first; foundation last, because the
    # exec driver's per-task chroots keep the client busy for minutes after its jobs end.
    return {
        "dispatch": [py, "bench/dispatch.py", "--out", str(RESULTS / "dispatch.md")]
        + (["--samples", "10", "--spread", "60"] if quick else []),
        "load": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/e2e/test_load.py"],
        "runtime": [py, "bench/entry_latency.py", "--out", out["runtime"]]
        + (["--runs", "15"] if quick else []),
        "signing": [py, "bench/signing.py", "--out", str(RESULTS / "signing.md")]
        + (["--size-mb", "256"] if quick else []),
        "mpi": [py, "bench/mpi.py", "--out", str(RESULTS / "mpi.md")]
        + (["--runs", "3"] if quick else []),
        "mpi_nodes": [py, "bench/mpi_nodes.py", "--out", str(RESULTS / "mpi_nodes.md")]
        + (["--runs", "3", "--starts", "3"] if quick else []),
        "scale": [py, "bench/scale.py", "--out", str(RESULTS / "scale.md")],
        "lammps": [py, "bench/lammps.py", "--out", str(RESULTS / "lammps.md")]
        + (["--runs", "3"] if quick else []),
        "gpu": [py, "bench/gpu.py"],  # exits 77 without a GPU: the recorded results stay
        "images": [py, "bench/import_speed.py", "--out", out["images"]],
        "foundation": [py, "bench/start_latency.py", "--out", out["foundation"]]
        + (["--jobs", "20", "--batch", "40", "--exec-jobs", "5", "--exec-batch", "10"]
           if quick else []),
    }  # fmt: skip


def run_all(names: list[str], quick: bool, soak: bool) -> dict[str, float]:
    took = {}
    env = {
        **os.environ,
        "PYHPC_CLUSTER_REUSE": "1",
        "PYHPC_LOAD_REPORT": str(RESULTS / "load.json"),
    }
    if soak:
        env["PYHPC_SOAK"] = "full"
    for name in names:
        command = benchmarks(quick)[name]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        done = subprocess.run(command, cwd=REPO, env=env)
        took[name] = time.monotonic() - started
        if done.returncode != 0:
            print(f"== {name} failed (exit {done.returncode}); its last results stay", flush=True)
    return took


def mpi_bandwidth(impl: str, where: str, r: dict[str, float]) -> tuple[str, str, str, str]:
    """A ratio row for an MPI ping-pong result of bench/mpi.py or bench/mpi_nodes.py."""
    return (
        f"MPI ping-pong bandwidth, {impl}, {where}, vs the host",
        f"{r['pyhpc_bw']:.0f} MB/s",
        f"{r['host_bw']:.0f} MB/s",
        f"{r['pyhpc_bw'] / r['host_bw']:.2f}x",
    )


def load(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def bars(
    path: Path, title: str, unit: str, rows: list[tuple[str, float]], log: bool = False
) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names, values = [r[0] for r in rows], [r[1] for r in rows]
    colours = ["#1f6fb4" if "pyhpc" in n else "#9a9a9a" for n in names]
    ax.barh(names, values, color=colours)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


Ratios = list[tuple[str, str, str, str]]  # (benchmark, pyhpc, anchor, ratio)


def _foundation(found: dict[str, Any], ratios: Ratios, plots: list[str]) -> None:
    """Nomad start latency and throughput against exec and raw_exec."""
    rows = found["rows"]
    bars(
        RESULTS / "start_latency.png",
        "Nomad: job registered -> task started (p50)",
        "s",
        [(f"{d} driver", r["p50"]) for d, r in rows.items()],
        log=True,
    )
    plots.append("start_latency.png")
    for anchor in ("exec", "raw_exec"):
        ratios.append(
            (
                f"Nomad start latency p50 vs `{anchor}` driver",
                f"{rows['pyhpc']['p50']:.3f} s",
                f"{rows[anchor]['p50']:.3f} s",
                f"{rows['pyhpc']['p50'] / rows[anchor]['p50']:.2f}x",
            )
        )
    ratios.append(
        (
            "Nomad batch throughput vs `raw_exec`",
            f"{rows['pyhpc']['tput']:.1f}/s",
            f"{rows['raw_exec']['tput']:.1f}/s",
            f"{rows['pyhpc']['tput'] / rows['raw_exec']['tput']:.2f}x",
        )
    )


def _entry(entry: dict[str, Any], ratios: Ratios, plots: list[str]) -> None:
    """Container entry against ch-run and podman."""
    measured = [(n, m * 1e3) for n, m, _, _ in entry["rows"] if m]
    bars(
        RESULTS / "entry_latency.png",
        "Container entry, /bin/true (median)",
        "ms",
        measured,
        log=True,
    )
    plots.append("entry_latency.png")
    by = {n.split(" (squashfuse)")[0]: m for n, m in measured}
    for anchor in ("ch-run, SquashFS", "podman run (runc)"):
        if anchor in by and "pyhpc run" in by:
            ratios.append(
                (
                    f"`pyhpc run` entry vs {anchor}",
                    f"{by['pyhpc run']:.1f} ms",
                    f"{by[anchor]:.1f} ms",
                    f"{by['pyhpc run'] / by[anchor]:.2f}x",
                )
            )


def _mpi(ratios: Ratios) -> None:
    """MPI on one node and across two, against the host."""
    mpi = load("mpi")
    for impl, r in (mpi["results"] if mpi else {}).items():
        ratios.append(mpi_bandwidth(impl, "one node", r))
        ratios.append(
            (
                f"MPI ping-pong latency, {impl}, one node, vs the host",
                f"{r['pyhpc_lat']:.2f} us",
                f"{r['host_lat']:.2f} us",
                f"{r['pyhpc_lat'] / r['host_lat']:.2f}x",
            )
        )
    nodes = load("mpi_nodes")
    if nodes:
        for impl, r in nodes["pingpong"].items():
            ratios.append(mpi_bandwidth(impl, "two nodes", r))
        for workers, times in nodes["start_s"].items():
            ratios.append(
                (
                    f"MPI `nomad job run` to all ranks started, {workers} workers",
                    f"{statistics.median(times):.2f} s",
                    "-",
                    "-",
                )
            )
    lammps = load("lammps")
    if lammps:
        ratios.append(
            (
                f"LAMMPS LJ melt, {lammps['atoms']:,} atoms, two nodes, vs the host",
                f"{lammps['pyhpc']:.2f} timesteps/s",
                f"{lammps['host']:.2f} timesteps/s",
                f"{lammps['ratio']:.2f}x",
            )
        )


def report() -> str:
    """report.md and the plots, from whatever results exist; returns the markdown."""
    ratios: list[tuple[str, str, str, str]] = []  # (benchmark, pyhpc, anchor, ratio)
    plots: list[str] = []
    found = load("foundation")
    if found:
        _foundation(found, ratios, plots)
    entry = load("runtime")
    if entry:
        _entry(entry, ratios, plots)
    images = load("images")
    if images:
        timed = [(r[0], r[1]) for r in images["rows"] if r[1]]
        bars(RESULTS / "import.png", "Image import, six layers from a registry", "s", timed)
        plots.append("import.png")
        ours = timed[0][1]
        for name, t in timed[1:]:
            ratios.append(
                (f"image import vs {name}", f"{ours:.1f} s", f"{t:.1f} s", f"{ours / t:.2f}x")
            )

    signing = load("signing")
    if signing:
        ratios.append(
            (
                "signature re-check vs `sha256sum` of the image",
                f"{signing['rehash_s']:.2f} s",
                f"{signing['sha256sum_s']:.2f} s",
                f"{signing['rehash_s'] / signing['sha256sum_s']:.2f}x",
            )
        )
        ratios.append(
            (
                "signature check per start, warm",
                f"{signing['warm_median_ms']:.3f} ms",
                "target 5 ms",
                f"{signing['warm_median_ms'] / 5:.3f}x",
            )
        )

    dispatch = load("dispatch")
    if dispatch:
        lat = dispatch["latency"]
        bars(
            RESULTS / "dispatch.png",
            "Dispatch -> task started (p50)",
            "s",
            [(k, v["p50"]) for k, v in lat.items()],
        )
        plots.append("dispatch.png")
        cli = lat["nomad job dispatch (CLI), same region"]["p50"]
        cross = lat["pyhpc dispatch, cross-region (global -> east)"]["p50"]
        ratios.append(
            (
                "cross-region dispatch vs `nomad job dispatch` same region",
                f"{cross:.3f} s",
                f"{cli:.3f} s",
                f"{cross / cli:.2f}x",
            )
        )

    _mpi(ratios)

    gpu = load("gpu")
    if gpu:
        m = gpu["measures"]
        ratios.append(
            (
                f"GPU injection per task ({m['gpu']}), reservation + mounts",
                f"{m['reservation_ms'] + m['mounting_ms']:.1f} ms",
                "target 20 ms",
                f"{(m['reservation_ms'] + m['mounting_ms']) / 20:.3f}x",
            )
        )

    load_run = load("load")
    if load_run:
        samples = load_run["samples"]
        fig, ax = plt.subplots(figsize=(8, 3.2))
        t = [s[0] for s in samples]
        ax.plot(t, [s[1] for s in samples], color="#1f6fb4", label="driver RSS (MB)")
        ax.set_xlabel("s")
        ax.set_ylabel("MB")
        ax2 = ax.twinx()
        ax2.plot(t, [s[3] for s in samples], color="#d08000", label="tasks running")
        ax2.plot(t, [s[2] for s in samples], color="#7a7a7a", label="driver CPU (s)")
        ax2.set_ylabel("tasks / CPU s")
        fig.legend(loc="upper right", fontsize=8)
        ax.set_title(
            f"Load: {load_run['concurrent']} at once, then {load_run['sequential']} in a row",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(RESULTS / "load.png", dpi=110)
        plt.close(fig)
        plots.append("load.png")
        ratios.append(
            (
                "driver RSS after the load vs before",
                f"{load_run['rss_end_mb']:.1f} MB",
                f"{load_run['rss_start_mb']:.1f} MB",
                f"{load_run['rss_end_mb'] / load_run['rss_start_mb']:.2f}x",
            )
        )

    for size in load("scale") or []:  # bench/scale.py: one entry per size, its own plot
        plots.append(f"scale-{size['tasks']}.png")
        if "recover_all_s" in size:
            ratios.append(
                (
                    f"{size['tasks']} concurrent tasks: all up / all recovered after a driver "
                    "kill -9 / driver CPU and RSS while they run",
                    f"{size['start_all_s']} s / {size['recover_all_s']} s / "
                    f"{size['steady_cpu_pct']} %, {size['steady_rss_mb']} MB",
                    "-",
                    "-",
                )
            )
        else:
            ratios.append(
                (
                    f"{size['tasks']} concurrent tasks: the limit on this machine",
                    f"{size['reached']} up, then {size['stopped_short']}",
                    "-",
                    "-",
                )
            )

    lines = [
        "# pyhpc benchmark report",
        "",
        f"Written by `python bench/report.py` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} "
        "UTC, "
        f"{os.cpu_count()} CPUs. Each benchmark ran with its anchors in the same run; its own "
        "table is in the file named below. Ratio: pyhpc over the anchor (below 1 is faster or "
        "smaller).",
        "",
        "| measure | pyhpc | anchor | ratio |",
        "|---|---|---|---|",
        *(f"| {m} | {p} | {a} | {r} |" for m, p, a, r in ratios),
        "",
        "Tables: [foundation.md](foundation.md) (Nomad start latency, throughput, memory), "
        "[runtime.md](runtime.md) (container entry), [images.md](images.md) (import), "
        "[signing.md](signing.md), [dispatch.md](dispatch.md), [mpi.md](mpi.md), "
        "[mpi_nodes.md](mpi_nodes.md), [lammps.md](lammps.md), [scale.md](scale.md), "
        "[gpu.md](gpu.md), and the load summary in "
        "[load.json](load.json).",
        "",
        *(f"![{p}]({p})" for p in plots),
        "",
    ]
    text = "\n".join(lines)
    (RESULTS / "report.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples, same rows")
    parser.add_argument("--soak", action="store_true", help="the full load (about 20 minutes)")
    parser.add_argument("--only", default="", help="comma-separated benchmarks to run")
    parser.add_argument("--report-only", action="store_true", help="run nothing, rewrite report")
    args = parser.parse_args()
    names = list(benchmarks(args.quick))
    chosen = [n for n in args.only.split(",") if n] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (choose from {', '.join(names)})")
    if not args.report_only:
        took = run_all(chosen, args.quick, args.soak)
        print("took:", {k: f"{v:.0f} s" for k, v in took.items()})
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
