"""`pyhpc dispatch`: dispatch a parameterized job across regions and follow it to the end."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dispatch",
        help="dispatch a parameterized job to one or more regions and follow it",
        description="Dispatch JOB (registered with `nomad job run`) COUNT times: to the listed "
        "regions in turn (--placement spread, the default) or all to the region with the most "
        "free CPU (--placement best). Exit 0 only if every dispatched job completed with exit "
        "code 0.",
    )
    p.add_argument("job", metavar="JOB")
    p.add_argument(
        "--address",
        default=os.environ.get("NOMAD_ADDR", "http://127.0.0.1:4646"),
        help="any Nomad agent of the federation (default $NOMAD_ADDR)",
    )
    p.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="REGION",
        help="target region (repeat for several; default: every region)",
    )
    p.add_argument("--count", type=int, default=1, help="instances to dispatch (default 1)")
    p.add_argument("--placement", choices=("spread", "best"), default="spread")
    p.add_argument("--meta", action="append", default=[], metavar="K=V")
    p.add_argument("--payload", metavar="FILE", help="payload file ('-' for stdin)")
    p.add_argument(
        "--token",
        default="",
        help="idempotency token: re-running with the same token dispatches nothing new",
    )
    p.add_argument("--no-follow", action="store_true", help="dispatch and return")


def _table(runs: list) -> str:  # type: ignore[type-arg]
    lines = [f"{'#':>3}  {'REGION':12} {'JOB':40} {'STATE':9} {'EXIT':>4}  NOTE"]
    for r in runs:
        code = "" if r.exit_code is None else str(r.exit_code)
        lines.append(
            f"{r.instance:>3}  {r.region:12} {r.job or '-':40} {r.state:9} {code:>4}  {r.note}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from nomad_driver.federation.dispatch import DispatchError, Nomad, dispatch, follow, plan

    meta = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"pyhpc dispatch: --meta {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        meta[key] = value
    payload = b""
    if args.payload:
        payload = (
            sys.stdin.buffer.read() if args.payload == "-" else open(args.payload, "rb").read()
        )  # noqa: SIM115
    nomad = Nomad(args.address, os.environ.get("NOMAD_TOKEN", ""))
    try:
        regions = args.region or nomad.regions()
        targets = plan(nomad, regions, args.count, args.placement)
        runs = dispatch(nomad, args.job, targets, meta, payload, args.token, fallbacks=regions)
        print(_table(runs), flush=True)
        if not args.no_follow:
            follow(nomad, runs, lambda rs: print("\n" + _table(rs), flush=True))
    except DispatchError as err:
        print(f"pyhpc dispatch: {err}", file=sys.stderr)
        return 1
    done = [r for r in runs if r.state == "complete" and r.exit_code in (0, None)]
    print(f"\n{len(done)} of {len(runs)} completed successfully")
    if args.no_follow:
        return 0 if all(r.job for r in runs) else 1
    return 0 if len(done) == len(runs) else 1
