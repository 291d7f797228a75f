"""`pyhpc job sync`: register one jobspec in several regions (the open-source stand-in for
Nomad Enterprise's multiregion block), showing each region's diff before writing."""

from __future__ import annotations

import argparse
import sys

from nomad_driver.cli import add_var_flags, job_variables, variables_file
from nomad_driver.federation import nomad


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("job", help="work with jobs across regions")
    acts = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    sync = acts.add_parser(
        "sync",
        help="register a jobspec in several regions, showing the diff first",
        description="Parse FILE with Nomad's parser, show for each region what registering it "
        "would change (Nomad's plan diff), then register it where it changes something. "
        "--dry-run stops after the diffs.",
    )
    sync.add_argument("file", metavar="FILE")
    sync.add_argument(
        "-region",
        "--region",
        action="append",
        default=[],
        metavar="REGION",
        help="target region (repeat; default: $NOMAD_REGION, else every region)",
    )
    nomad.add_flags(sync, region=False)
    sync.add_argument("--dry-run", action="store_true", help="show the diffs, change nothing")
    add_var_flags(sync)


def run(args: argparse.Namespace) -> int:
    from nomad_driver.federation.dispatch import (
        DispatchError,
        Nomad,
        describe_diff,
        parse_jobspec,
        plan_diff,
        register,
    )

    settings = nomad.settings_from(args)
    client = Nomad(settings)
    try:
        values = job_variables(args.var, args.var_file)
    except ValueError as err:
        print(f"pyhpc job sync: {err}", file=sys.stderr)
        return 2
    try:
        with open(args.file, encoding="utf-8") as f:
            job = parse_jobspec(client, f.read(), variables_file(values))
        regions = args.region or ([settings.region] if settings.region else client.regions())
        changes = {}
        failed = []
        for region in regions:
            try:
                lines = describe_diff(plan_diff(client, job, region))
            except DispatchError as err:  # one region down: the others still get the job
                print(f"region {region}: not synced: {err}", file=sys.stderr)
                failed.append(region)
                continue
            changes[region] = lines
            print(f"region {region}: " + ("no change" if not lines else f"{len(lines)} change(s)"))
            for line in lines:
                print(f"  {line}")
        if not args.dry_run:
            for region, lines in changes.items():
                if lines:
                    evaluation = register(client, job, region)
                    print(f"region {region}: registered (evaluation {evaluation[:8]})")
        if failed:
            return 1
    except OSError as err:
        print(f"pyhpc job sync: {args.file}: {err.strerror}", file=sys.stderr)
        return 1
    except DispatchError as err:
        print(f"pyhpc job sync: {err}", file=sys.stderr)
        return 1
    return 0
