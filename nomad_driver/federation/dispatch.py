"""`pyhpc dispatch`: dispatch a parameterized job to one region, a list of regions, spread over
them, or to the one with the most free CPU, through Nomad's HTTP API (the one seam here); then
follow every dispatched job to its end.

Each dispatch carries an idempotency token (the caller's, or one made per invocation), so a
retried `pyhpc dispatch` never starts the same instance twice. A region that cannot be reached
is skipped for the next one in the list (failover) and said so.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from nomad_driver.federation.nomad import Nomad as Nomad
from nomad_driver.federation.nomad import NomadError

TERMINAL = {"complete", "failed", "lost"}
DispatchError = NomadError  # what dispatch raises: Nomad's refusals, and its own


@dataclass
class Run:
    instance: int
    region: str
    job: str = ""
    state: str = "pending"
    exit_code: int | None = None
    note: str = ""
    alloc: str = ""
    tasks: tuple[str, ...] = ()


@dataclass
class Need:
    """What one dispatched instance asks of a node: CPU MHz, memory MB, GPUs (devices)."""

    cpu: int = 0
    memory: int = 0
    gpus: int = 0


def room(nomad: Nomad, region: str, need: Need) -> tuple[int, int]:
    """(instances of need that fit now, free CPU MHz) over the region's ready nodes."""
    fits = free_cpu = 0
    for stub in nomad.call("GET", "/v1/nodes", region):
        if stub.get("Status") != "ready" or stub.get("SchedulingEligibility") != "eligible":
            continue
        node = nomad.call("GET", f"/v1/node/{stub['ID']}", region)
        res, reserved = node.get("NodeResources") or {}, node.get("ReservedResources") or {}
        cpu = _get(res, "Cpu", "CpuShares") - _get(reserved, "Cpu", "CpuShares")
        mem = _get(res, "Memory", "MemoryMB") - _get(reserved, "Memory", "MemoryMB")
        gpus = sum(
            sum(1 for i in d.get("Instances") or [] if i.get("Healthy"))
            for d in res.get("Devices") or []
            if d.get("Type") == "gpu"
        )
        for alloc in nomad.call("GET", f"/v1/node/{stub['ID']}/allocations", region):
            if alloc.get("ClientStatus") not in ("pending", "running"):
                continue
            for task in (alloc.get("AllocatedResources") or {}).get("Tasks", {}).values():
                cpu -= _get(task, "Cpu", "CpuShares")
                mem -= _get(task, "Memory", "MemoryMB")
                gpus -= sum(len(d.get("DeviceIDs") or []) for d in task.get("Devices") or [])
        cpu, mem, gpus = max(0, cpu), max(0, mem), max(0, gpus)
        free_cpu += cpu
        limits = [
            free // wanted
            for free, wanted in ((cpu, need.cpu), (mem, need.memory), (gpus, need.gpus))
            if wanted
        ]
        fits += min(limits) if limits else 1
    return fits, free_cpu


def _get(block: dict[str, Any], key: str, field: str) -> int:
    return int((block.get(key) or {}).get(field) or 0)


def need_of(job: dict[str, Any]) -> Need:
    """One instance's resources: the sum over the job's groups (times count) and tasks."""
    need = Need()
    for group in job.get("TaskGroups") or []:
        count = int(group.get("Count") or 1)
        for task in group.get("Tasks") or []:
            res = task.get("Resources") or {}
            need.cpu += count * int(res.get("CPU") or 0)
            need.memory += count * int(res.get("MemoryMB") or 0)
            need.gpus += count * sum(
                int(d.get("Count") or 0)
                for d in res.get("Devices") or []
                if "gpu" in str(d.get("Name", "")).split("/")
            )
    return need


def plan(
    nomad: Nomad, regions: list[str], count: int, placement: str, need: Need | None = None
) -> list[str]:
    """The region of each instance: round-robin over regions ("spread"), or each to the region
    where the most instances still fit, counting the ones already placed ("best")."""
    if not regions:
        regions = nomad.regions()
    if placement != "best":
        return [regions[i % len(regions)] for i in range(count)]
    space: dict[str, list[int]] = {}
    for region in regions:
        try:
            space[region] = list(room(nomad, region, need or Need()))
        except DispatchError as err:
            if not unreachable(err):
                raise
    if not space:
        raise DispatchError(f"no region reachable among {', '.join(regions)}")
    targets = []
    for _ in range(count):
        best = max(space, key=lambda r: (space[r][0], space[r][1], -regions.index(r)))
        space[best][0] -= 1
        targets.append(best)
    return targets


def ensure_job(nomad: Nomad, job: str, regions: list[str], home: str) -> list[str]:
    """Register the parameterized job, as it is in the home region, in every reachable region
    of regions that lacks it. Returns what was done, one line per region."""
    done: list[str] = []
    source = None
    for region in regions:
        if region == home:
            continue
        try:
            if nomad.job(job, region) is not None:
                continue
            if source is None:
                source = nomad.job(job, home)
                if source is None:
                    raise DispatchError(
                        f"job {job!r} is not registered in region {home or 'of the agent'}"
                    )
            register(nomad, _registrable(source), region)
        except DispatchError as err:
            if not unreachable(err):
                raise
            continue
        done.append(f"region {region}: registered {job} (copied from {home or 'the agent'})")
    return done


def _registrable(job: dict[str, Any]) -> dict[str, Any]:
    """A job as read back, less what the server owns (indexes, status, versions)."""
    owned = {
        "Status", "StatusDescription", "Version", "SubmitTime", "CreateIndex",
        "ModifyIndex", "JobModifyIndex", "Stable",
    }  # fmt: skip
    return {k: v for k, v in job.items() if k not in owned}


def dispatch(
    nomad: Nomad,
    job: str,
    targets: list[str],
    meta: dict[str, str],
    payload: bytes = b"",
    token: str = "",
    fallbacks: list[str] | None = None,
) -> list[Run]:
    """Dispatch one instance per target region; on an unreachable region, the next fallback.

    Every instance carries Nomad's idempotency token and a tag in its job ID made from the
    token and its number, so a retry first finds instances already dispatched in any reachable
    region (a failed-over one included) and dispatches only the missing ones."""
    # Only a caller's token can have been used before: a fresh one needs no look-up.
    existing_possible = bool(token)
    token = token or uuid.uuid4().hex
    tag = hashlib.sha256(token.encode()).hexdigest()[:12]
    candidates = list(dict.fromkeys([*targets, *(fallbacks or [])]))
    existing = _dispatched(nomad, job, tag, candidates) if existing_possible else {}
    runs = []
    for i, region in enumerate(targets):
        run = Run(i, region)
        runs.append(run)
        if i in existing:
            run.region, run.job = existing[i]
            run.note = "dispatched before (same token)"
            continue
        body: dict[str, Any] = {
            "Meta": meta,
            "IdempotencyToken": f"{token}-{i}",
            "IdPrefixTemplate": f"{tag}-{i}",
        }
        if payload:
            body["Payload"] = base64.b64encode(payload).decode()
        for candidate in [region, *[r for r in candidates if r != region]]:
            try:
                reply = nomad.call(
                    "POST", f"/v1/job/{quote(job, safe='')}/dispatch", candidate, json=body
                )
            except DispatchError as err:
                if not unreachable(err):
                    run.state, run.note = "refused", str(err)
                    break
                run.note += f"{candidate} unreachable; "
                continue
            run.region, run.job = candidate, reply["DispatchedJobID"]
            if candidate != region:
                run.note += f"failed over from {region}"
            break
        else:
            run.state = "unreachable"
            run.note += "no region left to try"
    return runs


def _dispatched(nomad: Nomad, job: str, tag: str, regions: list[str]) -> dict[int, tuple[str, str]]:
    """Instances of this token already dispatched: number -> (region, job ID)."""
    found: dict[int, tuple[str, str]] = {}
    prefix = f"{job}/dispatch-{tag}-"
    for region in regions:
        try:
            jobs = nomad.call("GET", "/v1/jobs", region, params={"prefix": prefix})
        except DispatchError as err:
            if not unreachable(err):
                raise
            continue
        for stub in jobs or []:
            number = stub["ID"][len(prefix) :].split("-", 1)[0]
            if number.isdigit() and stub.get("ParentID") == job:
                found.setdefault(int(number), (region, stub["ID"]))
    return found


def follow(
    nomad: Nomad,
    runs: list[Run],
    on_change: Callable[[list[Run]], None],
    poll: float = 1.0,
    timeout: float = 0,
) -> None:
    """Poll until every dispatched job ends (one allocation list per region and round);
    on_change(the runs that changed) after each change."""
    deadline = time.monotonic() + timeout if timeout else None
    while any(r.job and r.state not in TERMINAL for r in runs):
        changed = []
        for region in sorted({r.region for r in runs if r.job and r.state not in TERMINAL}):
            mine = {r.job: r for r in runs if r.region == region and r.job}
            try:
                allocs = nomad.call("GET", "/v1/allocations", region)
            except DispatchError as err:
                for run in mine.values():
                    run.note = str(err)
                continue
            latest: dict[str, dict[str, Any]] = {}
            for alloc in allocs or []:
                job_id, seen = alloc["JobID"], latest.get(alloc["JobID"])
                if job_id in mine and (not seen or alloc["CreateIndex"] > seen["CreateIndex"]):
                    latest[job_id] = alloc
            for job_id, alloc in latest.items():
                run, state = mine[job_id], alloc["ClientStatus"]
                run.alloc, run.tasks = alloc["ID"], tuple(sorted(alloc.get("TaskStates") or {}))
                if state != run.state and run.state not in TERMINAL:
                    run.state = state
                    if state in TERMINAL:
                        run.exit_code = _exit_code(alloc)
                    changed.append(run)
        if changed:
            on_change(changed)
        if deadline and time.monotonic() > deadline:
            raise DispatchError("gave up following the dispatched jobs (timeout)")
        if any(r.job and r.state not in TERMINAL for r in runs):
            time.sleep(poll)


def output(nomad: Nomad, run: Run, stream: str = "stdout") -> str:
    """What the run's tasks wrote to stream (through the region's servers to its client)."""
    parts = []
    for task in run.tasks:
        text = nomad.call(
            "GET",
            f"/v1/client/fs/logs/{run.alloc}",
            run.region,
            params={"task": task, "type": stream, "origin": "start", "plain": "true"},
            raw=True,
        )
        parts.append(text)
    return "".join(parts)


def unreachable(err: NomadError) -> bool:
    """A region that is down, has no leader, or is not federated."""
    return err.unreachable


def _exit_code(alloc: dict[str, Any]) -> int | None:
    codes = []
    for state in (alloc.get("TaskStates") or {}).values():
        for event in state.get("Events") or []:
            if event.get("Type") == "Terminated":
                codes.append(int(event.get("ExitCode", 0)))
    return max(codes) if codes else None


def parse_jobspec(nomad: Nomad, hcl: str, variables: str = "") -> dict[str, Any]:
    """Nomad's own parse of an HCL jobspec (the agent's parser, so every HCL feature works),
    with variables as the content of a variables file."""
    body = {"JobHCL": hcl, "Canonicalize": True, "Variables": variables}
    job: dict[str, Any] = nomad.call("POST", "/v1/jobs/parse", "", json=body)
    return job


def _placed(nomad: Nomad, job: dict[str, Any], region: str) -> dict[str, Any]:
    """The job for region, in the namespace of the settings when they name one (as Nomad's
    CLI does with -namespace)."""
    namespace = nomad.settings.namespace
    return {**job, "Region": region, **({"Namespace": namespace} if namespace else {})}


def plan_diff(nomad: Nomad, job: dict[str, Any], region: str) -> dict[str, Any]:
    """Nomad's plan of registering job in region, with the diff against what runs there."""
    job = _placed(nomad, job, region)
    reply: dict[str, Any] = nomad.call(
        "POST", f"/v1/job/{job['ID']}/plan", region, json={"Job": job, "Diff": True}
    )
    return reply.get("Diff") or {}


def register(nomad: Nomad, job: dict[str, Any], region: str) -> str:
    job = _placed(nomad, job, region)
    reply = nomad.call("POST", "/v1/jobs", region, json={"Job": job})
    return str(reply.get("EvalID") or "")


def describe_diff(diff: dict[str, Any], indent: str = "  ") -> list[str]:
    """Nomad's structured job diff as readable lines (+ added, - removed, ~ changed)."""
    marks = {"Added": "+", "Deleted": "-", "Edited": "~", "None": " "}
    lines = []

    def walk(node: dict[str, Any], depth: int) -> None:
        for field in node.get("Fields") or []:
            if field.get("Type") != "None":
                old, new = field.get("Old", ""), field.get("New", "")
                lines.append(
                    f"{indent * depth}{marks[field['Type']]} {field['Name']}: {old!r} => {new!r}"
                )
        for obj in node.get("Objects") or []:
            if obj.get("Type") != "None":
                lines.append(f"{indent * depth}{marks[obj['Type']]} {obj['Name']}")
                walk(obj, depth + 1)
        for key in ("TaskGroups", "Tasks"):
            for child in node.get(key) or []:
                if child.get("Type") != "None":
                    lines.append(
                        f"{indent * depth}{marks[child['Type']]} {key[:-1]} {child['Name']!r}"
                    )
                    walk(child, depth + 1)

    if diff.get("Type") == "Added":
        return ["+ new job"]
    walk(diff, 0)
    return lines
