"""`pyhpc provenance ALLOC_ID|FILE`: what a task (or a `pyhpc run`) ran, from its record."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from nomad_driver.federation.nomad import add_flags

    p = sub.add_parser(
        "provenance",
        help="show what a task or a `pyhpc run` ran: image digest and sources, signatures, "
        "node, command, environment, mounts, limits, result",
        description="ALLOC_ID (or a unique prefix): each pyhpc task's alloc/logs/TASK."
        "provenance.json, read through Nomad's API; FILE: a record `pyhpc run --provenance` "
        "wrote or one copied from there. `pyhpc run --replay FILE` runs it again.",
    )
    p.add_argument("what", metavar="ALLOC_ID|FILE")
    p.add_argument("--task", help="only this task of the allocation")
    p.add_argument("--json", action="store_true", help="print the records as they are")
    add_flags(p)


def describe(data: dict[str, Any]) -> str:
    """The record as lines a person reads."""
    image = data.get("image") or {}
    where = data.get("where") or {}
    host = data.get("host") or {}
    gpu = host.get("gpu") or {}
    exit_ = data.get("exit") or {}
    lines = [
        f"image      {image.get('digest', '?')}  {image.get('reference', '')}",
    ]
    if image.get("source") and image["source"] != image.get("reference"):
        lines.append(f"           imported from {image['source']}")
    if image.get("manifest_digest"):
        lines.append(f"manifest   {image['manifest_digest']}  config {image.get('config_digest')}")
    for s in data.get("signatures") or []:
        if s.get("mode", "off") != "off":
            what = s.get("key") or s.get("failed") or "not verified"
            lines.append(f"signature  {s.get('mode')}: {what} {s.get('version', '')}".rstrip())
    lines.append(f"command    {json.dumps(data.get('command'))}  in {data.get('work_dir')}")
    env = data.get("env") or {}
    lines.append(f"env        {', '.join(f'{k}={v}' for k, v in env.items())}")
    if data.get("env_withheld"):
        lines.append(f"           and, values not recorded: {', '.join(data['env_withheld'])}")
    options = data.get("options") or {}
    shown = ("writable", "network", "cap_add", "cap_drop", "seccomp", "mounts", "datasets", "gpus")
    lines.append(
        "options    " + ", ".join(f"{k}={json.dumps(options[k])}" for k in shown if options.get(k))
    )
    for m in data.get("mounts") or []:
        if "dataset" in m:
            d = m["dataset"]
            lines.append(f"dataset    {m['path']} <- {d.get('reference')} {d.get('digest', '')}")
        else:
            ro = " (ro)" if m.get("read_only") else ""
            lines.append(f"mount      {m['path']} <- {m.get('source')}{ro}")
    node = where.get("node") or host.get("hostname", "")
    place = "/".join(str(where[k]) for k in ("region", "datacenter") if where.get(k))
    lines.append(
        f"where      {node} {place} {where.get('job', '')} {where.get('task', '')}".rstrip()
    )
    lines.append(
        f"host       pyhpc {host.get('pyhpc')}, {host.get('nomad') or 'no Nomad'}, kernel "
        f"{host.get('kernel')}, {host.get('cpu_model')} (microcode {host.get('microcode', '?')})"
    )
    if gpu.get("devices"):
        uuids = ", ".join(d["uuid"] for d in gpu["devices"])
        lines.append(
            f"gpu        driver {gpu.get('driver_version')} CUDA {gpu.get('cuda_version')}: {uuids}"
        )
    lines.append(f"started    {data.get('started_at')}  ended {data.get('ended_at', 'running')}")
    if exit_:
        lines.append(
            f"exit       code {exit_.get('code')} signal {exit_.get('signal')}"
            + (" (OOM killed)" if exit_.get("oom_killed") else "")
            + (f": {exit_['error']}" if exit_.get("error") else "")
        )
    return "\n".join(lines)


def records(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(label, record) for FILE, or for each pyhpc task of the allocation."""
    if os.path.isfile(args.what):
        with open(args.what, encoding="utf-8") as f:
            return [(args.what, json.load(f))]
    from nomad_driver.federation.nomad import Nomad, settings_from

    nomad = Nomad(settings_from(args))
    found = nomad.call("GET", "/v1/allocations", params={"prefix": args.what}) or []
    if not found:
        raise ValueError(f"no allocation {args.what!r} (and no such file)")
    if len(found) > 1:
        raise ValueError(f"{args.what!r} is the start of {len(found)} allocations; give more")
    alloc = nomad.call("GET", f"/v1/allocation/{found[0]['ID']}")
    tasks = [
        t["Name"]
        for group in alloc["Job"]["TaskGroups"]
        if group["Name"] == alloc["TaskGroup"]
        for t in group["Tasks"]
        if t.get("Driver") == "pyhpc" and (not args.task or t["Name"] == args.task)
    ]
    if not tasks:
        raise ValueError(
            f"allocation {alloc['ID'][:8]} has no pyhpc task{' ' + args.task if args.task else ''}"
        )
    out = []
    for task in tasks:
        text = nomad.call(
            "GET",
            f"/v1/client/fs/cat/{alloc['ID']}",
            params={"path": f"alloc/logs/{task}.provenance.json"},
            raw=True,
        )
        check_against_events(text, (alloc.get("TaskStates") or {}).get(task) or {}, task)
        out.append((f"{alloc['ID'][:8]} {task}", json.loads(text)))
    return out


def check_against_events(text: str, state: dict[str, Any], task: str) -> None:
    """The copy in alloc/logs lives where the task can write: it counts only if its digest is
    the one the driver put in the task's events (which the task cannot write)."""
    from nomad_driver.driver.provenance import RECORD_EVENT, digest_of

    said = [
        str(e.get("DisplayMessage") or "")
        for e in state.get("Events") or []
        if RECORD_EVENT in str(e.get("DisplayMessage") or "")
    ]
    if not said:
        raise ValueError(
            f"task {task}: the driver's events name no provenance record digest: cannot tell "
            "the record from one the task wrote"
        )
    wanted = "sha256:" + said[-1].split(RECORD_EVENT, 1)[1].split()[0].rstrip(".,;")
    if digest_of(text.encode()) != wanted:
        raise ValueError(
            f"task {task}: alloc/logs/{task}.provenance.json is not the record the driver "
            f"wrote (its events say {wanted[:19]}..., the file is {digest_of(text.encode())[:19]}"
            "...): it was changed"
        )


def run(args: argparse.Namespace) -> int:
    from nomad_driver.federation.nomad import NomadError

    try:
        found = records(args)
    except (OSError, ValueError, NomadError) as err:
        print(f"pyhpc provenance: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
        return 1
    for label, data in found:
        if args.json:
            print(json.dumps(data, indent=1, sort_keys=True))
        else:
            print(f"== {label}\n{describe(data)}")
    return 0
