"""`pyhpc dispatch`: dispatch a parameterized job across regions and follow it to the end."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import TYPE_CHECKING

from nomad_driver.cli import pairs
from nomad_driver.federation import nomad

if TYPE_CHECKING:
    from nomad_driver.federation.dispatch import Run

MANY = 20  # above this many instances, follow prints changed rows, not the whole table


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dispatch",
        help="dispatch a parameterized job to one or more regions and follow it",
        description="Dispatch JOB (registered with `nomad job run` in the region of -address) "
        "COUNT times: over the listed regions in turn (--placement spread, the default) or each "
        "instance to the region where the most such instances still fit, by free CPU, memory "
        "and GPUs (--placement best). A region that lacks JOB gets a copy of it first. An "
        "unreachable region's instances go to the next region listed; with one --region they "
        "fail. Exit 0 only if every dispatched job completed with exit code 0.",
        epilog="examples:\n"
        "  pyhpc dispatch hpc --region east --meta size=1000\n"
        "  pyhpc dispatch hpc --count 8 --meta size=1000        # spread over every region\n"
        "  pyhpc dispatch hpc --count 4 --placement best -idempotency-token run-42 "
        "--payload input.txt\n"
        "  NOMAD_ADDR=https://nomad.example:4646 NOMAD_CACERT=ca.pem NOMAD_TOKEN=... \\\n"
        "    pyhpc dispatch hpc -namespace hpc --region east",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", metavar="JOB")
    p.add_argument(
        "-region",
        "--region",
        action="append",
        default=[],
        metavar="REGION",
        help="target region (repeat for several; default: $NOMAD_REGION, else every region)",
    )
    p.add_argument("--count", type=_positive, default=1, help="instances to dispatch (default 1)")
    p.add_argument("--placement", choices=("spread", "best"), default="spread")
    p.add_argument("--meta", action="append", default=[], metavar="K=V")
    p.add_argument("--payload", metavar="FILE", help="payload file ('-' for stdin)")
    p.add_argument(
        "-idempotency-token",
        "--idempotency-token",
        default="",
        metavar="TOKEN",
        help="re-running with the same token dispatches nothing new, in any region",
    )
    p.add_argument(
        "--no-copy", action="store_true", help="do not register JOB in regions that lack it"
    )
    p.add_argument("--no-follow", action="store_true", help="dispatch and return")
    p.add_argument(
        "--output", action="store_true", help="print each instance's stdout when it ends"
    )
    p.add_argument(
        "--timeout", type=float, default=0, metavar="S", help="stop following after S seconds"
    )

    nomad.add_flags(p, region=False)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _row(r: Run) -> str:
    code = "" if r.exit_code is None else str(r.exit_code)
    return f"{r.instance:>3}  {r.region:12} {r.job or '-':48} {r.state:11} {code:>4}  {r.note}"


def _table(runs: list[Run]) -> str:
    header = f"{'#':>3}  {'REGION':12} {'JOB':48} {'STATE':11} {'EXIT':>4}  NOTE"
    return "\n".join([header, *(_row(r) for r in runs)])


def run(args: argparse.Namespace) -> int:
    from nomad_driver.federation.dispatch import (
        DispatchError,
        Nomad,
        dispatch,
        ensure_job,
        follow,
        need_of,
        output,
        plan,
    )

    try:
        meta = pairs(args.meta, "--meta")
    except ValueError as err:
        print(f"pyhpc dispatch: {err}", file=sys.stderr)
        return 2
    payload = b""
    if args.payload:
        try:
            with open(args.payload if args.payload != "-" else 0, "rb") as f:
                payload = f.read()
        except OSError as err:
            print(f"pyhpc dispatch: --payload: {err}", file=sys.stderr)
            return 2
    settings = nomad.settings_from(args)
    client = Nomad(settings)
    try:
        home = client.home()
        parent = client.job(args.job, home)
        if parent is None:
            where = f" in namespace {settings.namespace}" if settings.namespace else ""
            raise DispatchError(
                f"no job {args.job!r} in region {home or 'of the agent'}{where} (register it "
                "with `nomad job run`)"
            )
        if not parent.get("ParameterizedJob"):
            raise DispatchError(f"job {args.job!r} is not parameterized; nothing to dispatch")
        regions = args.region or ([settings.region] if settings.region else client.regions())
        if not args.no_copy:
            for line in ensure_job(client, args.job, regions, home):
                print(line, flush=True)
        targets = plan(client, regions, args.count, args.placement, need_of(parent))
        runs = dispatch(
            client, args.job, targets, meta, payload, args.idempotency_token, fallbacks=regions
        )
        print(_table(runs), flush=True)
        if not args.no_follow:
            many = len(runs) > MANY
            follow(
                client,
                runs,
                lambda changed: print(
                    "\n".join(_row(r) for r in changed) if many else "\n" + _table(runs),
                    flush=True,
                ),
                timeout=args.timeout,
            )
            if args.output:
                for r in runs:
                    if r.alloc:
                        text = output(client, r)
                        print(f"\n== {r.instance} {r.region} {r.job}\n{text}", end="", flush=True)
    except DispatchError as err:
        print(f"pyhpc dispatch: {err}", file=sys.stderr)
        return 1
    done = [r for r in runs if r.state == "complete" and r.exit_code in (0, None)]
    by_region = Counter(r.region for r in done)
    where = ", ".join(f"{n} in {region}" for region, n in sorted(by_region.items()))
    if args.no_follow:
        sent = [r for r in runs if r.job]
        print(f"\n{len(sent)} of {len(runs)} dispatched")
        return 0 if len(sent) == len(runs) else 1
    print(f"\n{len(done)} of {len(runs)} completed successfully" + (f" ({where})" if where else ""))
    return 0 if len(done) == len(runs) else 1
