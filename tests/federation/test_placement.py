"""Placement and bookkeeping logic of pyhpc dispatch, on recorded shapes of Nomad's answers
(the behaviour against the real federation is in tests/e2e/test_federation.py)."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_driver.federation.dispatch import (
    DispatchError,
    Need,
    Nomad,
    _dispatched,
    _registrable,
    need_of,
    plan,
    room,
    unreachable,
)

Answers = dict[tuple[str, str], Any]


class Recorded(Nomad):
    """Nomad with canned answers per (region, path)."""

    def __init__(self, answers: Answers) -> None:
        super().__init__("http://127.0.0.1:1")
        self.answers = answers

    def call(self, method: str, path: str, region: str | None = None, **kw: Any) -> Any:
        answer = self.answers[(region or "", path)]
        if isinstance(answer, DispatchError):
            raise answer
        return answer


def node(cpu: int, mem: int, gpus: int = 0) -> dict[str, Any]:
    devices = [{"Type": "gpu", "Instances": [{"Healthy": True}] * gpus}] if gpus else []
    return {
        "NodeResources": {
            "Cpu": {"CpuShares": cpu},
            "Memory": {"MemoryMB": mem},
            "Devices": devices,
        },
        "ReservedResources": {"Cpu": {"CpuShares": 100}, "Memory": {"MemoryMB": 100}},
    }


def alloc(cpu: int, mem: int, gpus: int = 0, status: str = "running") -> dict[str, Any]:
    task: dict[str, Any] = {"Cpu": {"CpuShares": cpu}, "Memory": {"MemoryMB": mem}}
    if gpus:
        task["Devices"] = [{"DeviceIDs": [f"GPU-{i}" for i in range(gpus)]}]
    return {"ClientStatus": status, "AllocatedResources": {"Tasks": {"t": task}}}


def region(name: str, nodes: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> Answers:
    answers: Answers = {
        (name, "/v1/nodes"): [
            {"ID": f"{name}{i}", "Status": "ready", "SchedulingEligibility": "eligible"}
            for i in range(len(nodes))
        ]
    }
    for i, (record, allocs) in enumerate(nodes):
        answers[(name, f"/v1/node/{name}{i}")] = record
        answers[(name, f"/v1/node/{name}{i}/allocations")] = allocs
    return answers


def test_need_sums_tasks_times_group_count_and_counts_only_gpus() -> None:
    job = {
        "TaskGroups": [
            {
                "Count": 2,
                "Tasks": [
                    {"Resources": {"CPU": 100, "MemoryMB": 64, "Devices": [
                        {"Name": "nvidia/gpu", "Count": 1}, {"Name": "fpga", "Count": 3}]}},
                    {"Resources": {"CPU": 50, "MemoryMB": 16}},
                ],
            }
        ]
    }  # fmt: skip
    assert need_of(job) == Need(cpu=300, memory=160, gpus=2)


def test_best_counts_what_fits_by_cpu_memory_and_gpus_less_allocations() -> None:
    answers = {
        **region("a", [(node(4100, 8100), [alloc(3000, 100)])]),  # 1000 MHz left: 5 of 200
        **region("b", [(node(2100, 2100, gpus=2), [alloc(100, 100, gpus=1)])]),  # 1 GPU left
    }
    nomad = Recorded(answers)
    assert room(nomad, "a", Need(200, 100)) == (5, 1000)
    assert room(nomad, "b", Need(200, 100, gpus=1)) == (1, 1900)
    assert room(nomad, "a", Need(200, 100, gpus=1)) == (0, 1000)
    # Each instance goes where the most still fit, counting the ones placed before it.
    assert plan(nomad, ["a", "b"], 4, "best", Need(200, 100)) == ["b", "b", "b", "b"]
    # Only b has a GPU left; once nothing fits anywhere, the backlog is shared out (the more
    # free CPU first), so each region queues as few as possible.
    assert plan(nomad, ["a", "b"], 3, "best", Need(200, 100, gpus=1)) == ["b", "b", "a"]


def test_finished_allocations_free_their_resources() -> None:
    nomad = Recorded(region("a", [(node(1100, 1100), [alloc(1000, 1000, status="complete")])]))
    assert room(nomad, "a", Need(500, 500)) == (2, 1000)


def test_best_skips_an_unreachable_region_and_fails_when_none_is_left() -> None:
    down = DispatchError("region b: Nomad unreachable (connection refused)", unreachable=True)
    nomad = Recorded({**region("a", [(node(1100, 1100), [])]), ("b", "/v1/nodes"): down})
    assert plan(nomad, ["b", "a"], 2, "best", Need(100, 100)) == ["a", "a"]
    with pytest.raises(DispatchError, match="no region reachable among b"):
        plan(nomad, ["b"], 1, "best")
    refused = DispatchError("region b: GET /v1/nodes: HTTP 403 Permission denied", 403)
    with pytest.raises(DispatchError, match="403"):
        plan(Recorded({("b", "/v1/nodes"): refused}), ["b"], 1, "best")


def test_spread_takes_regions_in_turn() -> None:
    assert plan(Recorded({}), ["a", "b", "c"], 5, "spread") == ["a", "b", "c", "a", "b"]


def test_unreachable_means_transport_not_a_refusal() -> None:
    assert unreachable(DispatchError("region x: Nomad unreachable (EOF)", unreachable=True))
    assert not unreachable(DispatchError("region x: POST ...: HTTP 400 missing required meta"))


def test_instances_already_dispatched_are_found_by_number_and_parent() -> None:
    prefix = "hpc/dispatch-abc-"
    nomad = Recorded({
        ("a", "/v1/jobs"): [
            {"ID": prefix + "0-1700000000-1234abcd", "ParentID": "hpc"},
            {"ID": prefix + "10-1700000000-1234abcd", "ParentID": "hpc"},
            {"ID": prefix + "x-1700000000-1234abcd", "ParentID": "hpc"},
        ],
        ("b", "/v1/jobs"): DispatchError("region b: unreachable (refused)", unreachable=True),
        ("c", "/v1/jobs"): [{"ID": prefix + "1-1700000001-ffffffff", "ParentID": "hpc"}],
    })  # fmt: skip
    found = _dispatched(nomad, "hpc", "abc", ["a", "b", "c"])
    assert found == {
        0: ("a", prefix + "0-1700000000-1234abcd"),
        10: ("a", prefix + "10-1700000000-1234abcd"),
        1: ("c", prefix + "1-1700000001-ffffffff"),
    }


def test_a_copied_job_leaves_out_what_the_server_owns() -> None:
    job = {"ID": "hpc", "Region": "global", "Version": 3, "ModifyIndex": 9, "Status": "running"}
    assert _registrable(job) == {"ID": "hpc", "Region": "global"}
