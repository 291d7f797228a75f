"""Site hooks through the real Nomad: the test bed's hook (scripts/testbed/cluster.sh,
write_test_hooks) adds a bind for a task that asks for it, and fails the start of one that
asks for that, with the hook's own words in the task's events; other tasks are untouched."""

from __future__ import annotations

from typing import Any

from test_foundation import completed, job, refused

ASK = '      env {\n        PYHPC_TEST_HOOK = "%s"\n      }'


def test_a_hook_adds_a_bind_and_one_that_fails_fails_the_start(cluster: Any) -> None:
    out, _ = completed(
        cluster, job("e2e-hook-mount", "cat /hooked/marker.txt", task_extra=ASK % "mount")
    )
    assert out.strip() == "bound by the test bed hook"
    refused(
        cluster,
        job("e2e-hook-fail", "echo never", task_extra=ASK % "fail"),
        "failed (exit 3): the test bed's hook refuses this task",
    )
    out, _ = completed(cluster, job("e2e-hook-none", "ls /hooked 2>&1 || echo absent"))
    assert "absent" in out  # the control: no bind for a task that asked for none
