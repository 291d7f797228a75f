"""`pyhpc dispatch`: dispatch a parameterized job to one region, a list of regions, spread over
them, or to the one with the most free CPU, through Nomad's HTTP API (the one seam here); then
follow every dispatched job to its end.

Each dispatch carries an idempotency token (the caller's, or one made per invocation), so a
retried `pyhpc dispatch` never starts the same instance twice. A region that cannot be reached
is skipped for the next one in the list (failover) and said so.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

TERMINAL = {"complete", "failed", "lost"}


class DispatchError(RuntimeError):
    pass


@dataclass
class Run:
    instance: int
    region: str
    job: str = ""
    state: str = "pending"
    exit_code: int | None = None
    note: str = ""


@dataclass
class Nomad:
    address: str
    token: str = ""
    timeout: float = 10.0

    def call(self, method: str, path: str, region: str, **kw: Any) -> Any:
        headers = {"X-Nomad-Token": self.token} if self.token else {}
        try:
            reply = requests.request(
                method,
                f"{self.address}{path}",
                params={"region": region} if region else None,
                headers=headers,
                timeout=self.timeout,
                **kw,
            )
        except requests.RequestException as err:
            raise DispatchError(f"region {region or 'default'}: Nomad unreachable ({err})") from err
        if reply.status_code >= 400:
            raise DispatchError(
                f"region {region or 'default'}: {method} {path}: HTTP {reply.status_code} "
                f"{reply.text.strip()[:200]}"
            )
        return reply.json() if reply.content else None

    def regions(self) -> list[str]:
        return list(self.call("GET", "/v1/regions", ""))

    def free_cpu(self, region: str) -> int:
        """CPU MHz not yet allocated on the region's ready nodes."""
        free = 0
        for stub in self.call("GET", "/v1/nodes", region):
            if stub.get("Status") != "ready" or stub.get("SchedulingEligibility") != "eligible":
                continue
            node = self.call("GET", f"/v1/node/{stub['ID']}", region)
            total = int(node.get("NodeResources", {}).get("Cpu", {}).get("CpuShares", 0))
            used = 0
            for alloc in self.call("GET", f"/v1/node/{stub['ID']}/allocations", region):
                if alloc.get("ClientStatus") in ("pending", "running"):
                    for task in alloc.get("AllocatedResources", {}).get("Tasks", {}).values():
                        used += int(task.get("Cpu", {}).get("CpuShares", 0))
            free += max(0, total - used)
        return free


def plan(nomad: Nomad, regions: list[str], count: int, placement: str) -> list[str]:
    """The region of each instance: round-robin over regions ("spread") or all on the region
    with the most free CPU ("best")."""
    if not regions:
        regions = nomad.regions()
    if placement == "best":
        scored = []
        for region in regions:
            try:
                scored.append((nomad.free_cpu(region), region))
            except DispatchError as err:
                if not _unreachable(err):
                    raise
                continue  # unreachable: not a candidate
        if not scored:
            raise DispatchError(f"no region reachable among {regions}")
        best = max(scored)[1]
        return [best] * count
    return [regions[i % len(regions)] for i in range(count)]


def dispatch(
    nomad: Nomad,
    job: str,
    targets: list[str],
    meta: dict[str, str],
    payload: bytes = b"",
    token: str = "",
    fallbacks: list[str] | None = None,
) -> list[Run]:
    """Dispatch one instance per target region; on an unreachable region, the next fallback."""
    token = token or uuid.uuid4().hex
    runs = []
    for i, region in enumerate(targets):
        run = Run(i, region)
        body = {"Meta": meta, "IdempotencyToken": f"{token}-{i}"}
        if payload:
            body["Payload"] = base64.b64encode(payload).decode()
        for candidate in [region, *[r for r in (fallbacks or []) if r != region]]:
            try:
                reply = nomad.call("POST", f"/v1/job/{job}/dispatch", candidate, json=body)
            except DispatchError as err:
                if not _unreachable(err):
                    run.state, run.note = "refused", str(err)
                    break
                run.note = f"{err}; "
                continue
            run.region, run.job = candidate, reply["DispatchedJobID"]
            if candidate != region:
                run.note += f"failed over from {region}"
            break
        else:
            run.state = "unreachable"
        runs.append(run)
    return runs


def follow(
    nomad: Nomad,
    runs: list[Run],
    on_change: Callable[[list[Run]], None],
    poll: float = 1.0,
    timeout: float = 0,
) -> None:
    """Poll every dispatched job until it ends; on_change(runs) after each change."""
    deadline = time.monotonic() + timeout if timeout else None
    while any(r.job and r.state not in TERMINAL for r in runs):
        changed = False
        for run in runs:
            if not run.job or run.state in TERMINAL:
                continue
            try:
                allocs = nomad.call("GET", f"/v1/job/{run.job}/allocations", run.region)
            except DispatchError as err:
                run.note = str(err)
                continue
            if not allocs:
                continue
            alloc = max(allocs, key=lambda a: a["CreateIndex"])
            state = alloc["ClientStatus"]
            if state != run.state:
                run.state, changed = state, True
                if state in TERMINAL:
                    run.exit_code = _exit_code(alloc)
        if changed:
            on_change(runs)
        if deadline and time.monotonic() > deadline:
            raise DispatchError("gave up following the dispatched jobs (timeout)")
        time.sleep(poll)


def _unreachable(err: DispatchError) -> bool:
    """A region that is down or not federated (Nomad says "No path to region")."""
    return "unreachable" in str(err) or "No path to region" in str(err)


def _exit_code(alloc: dict[str, Any]) -> int | None:
    codes = []
    for state in (alloc.get("TaskStates") or {}).values():
        for event in state.get("Events") or []:
            if event.get("Type") == "Terminated":
                codes.append(int(event.get("ExitCode", 0)))
    return max(codes) if codes else None


def parse_jobspec(nomad: Nomad, hcl: str) -> dict[str, Any]:
    """Nomad's own parse of an HCL jobspec (the agent's parser, so every HCL feature works)."""
    job: dict[str, Any] = nomad.call(
        "POST", "/v1/jobs/parse", "", json={"JobHCL": hcl, "Canonicalize": True}
    )
    return job


def plan_diff(nomad: Nomad, job: dict[str, Any], region: str) -> dict[str, Any]:
    """Nomad's plan of registering job in region, with the diff against what runs there."""
    job = {**job, "Region": region}
    reply: dict[str, Any] = nomad.call(
        "POST", f"/v1/job/{job['ID']}/plan", region, json={"Job": job, "Diff": True}
    )
    return reply.get("Diff") or {}


def register(nomad: Nomad, job: dict[str, Any], region: str) -> str:
    job = {**job, "Region": region}
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
