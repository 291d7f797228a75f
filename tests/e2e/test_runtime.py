"""Runtime guarantees seen through the real Nomad: OOM kills, policy refusals, seccomp."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from test_foundation import (
    IMAGE,
    completed,
    events_text,
    job,
    kill_plugin_and_await_recovery,
    refused,
    release,
    running_alloc,
)


def test_task_over_its_memory_limit_is_oom_killed_and_nomad_shows_it(cluster: Any) -> None:
    spec = job("e2e-oom", "dd if=/dev/zero of=/dev/null bs=300M count=1").replace(
        "memory = 64", "memory = 32"
    )
    job_id = cluster.run_job(spec)
    alloc = cluster.wait_alloc(job_id, {"failed"})
    terminated = [e for e in cluster.task_events(alloc, "t") if e["Type"] == "Terminated"]
    assert terminated, events_text(cluster, alloc)
    assert terminated[-1]["Details"].get("oom_killed") == "true", events_text(cluster, alloc)
    assert "OOM killed" in cluster.nomad("alloc", "status", alloc["ID"]).stdout
    cluster.stop_job(job_id)


def test_capability_outside_the_allowlist_is_refused_before_start(cluster: Any) -> None:
    spec = job("e2e-cap", "true", config_extra='        cap_add = ["SYS_ADMIN"]')
    refused(cluster, spec, "cap_add: SYS_ADMIN not in the plugin's allow_caps")


# seccomp_profile_dirs in plugin-config/pyhpc.hcl, which the test bed loads.
ADMIN_PROFILES = Path("/etc/pyhpc/seccomp")


@contextlib.contextmanager
def admin_profile(name: str, profile: object) -> Iterator[Path]:
    """A profile the admin installed (root's, 0644, in seccomp_profile_dirs), removed after."""
    made = not ADMIN_PROFILES.exists()
    ADMIN_PROFILES.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = ADMIN_PROFILES / name
    path.write_text(json.dumps(profile))
    path.chmod(0o644)
    try:
        yield path
    finally:
        path.unlink()
        if made:
            ADMIN_PROFILES.rmdir()


def test_malformed_seccomp_profile_is_refused_naming_it(cluster: Any) -> None:
    bad = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["chmod"], "action": "SCMP_ACT_SOMETIMES"}],
    }
    with admin_profile("e2e-bad.json", bad) as profile:
        spec = job("e2e-seccomp-bad", "true", config_extra='        seccomp = "e2e-bad"')
        expected = f"seccomp profile {profile}: syscalls[0].action 'SCMP_ACT_SOMETIMES'"
        refused(cluster, spec, expected)


def test_a_profile_an_earlier_job_wrote_is_refused_and_the_default_runs(cluster: Any) -> None:
    # The attack: one job leaves a profile that allows everything in its allocation directory
    # (on the node's disk); the next names it, hoping the root plugin reads it as policy.
    writer = cluster.run_job(
        job(
            "e2e-seccomp-writer",
            """echo '{"defaultAction": "SCMP_ACT_ALLOW"}' >/alloc/allow.json""",
        )
    )
    alloc = cluster.wait_alloc(writer, {"complete"})
    try:
        written = cluster.state_dir / "nomad" / "data" / "alloc" / alloc["ID"] / "alloc"
        written /= "allow.json"
        assert json.loads(written.read_text()) == {"defaultAction": "SCMP_ACT_ALLOW"}
        spec = job(
            "e2e-seccomp-tenant",
            "unshare -m true && echo seccomp-off",
            config_extra=f'        seccomp = "{written}"',
        )
        refused(
            cluster,
            spec,
            f'seccomp = "{written}" is not a profile in the plugin\'s seccomp_profile_dirs',
        )
    finally:
        cluster.stop_job(writer)
    # Control: the same task with the default profile runs, and the filter is on.
    out, _ = completed(
        cluster,
        job(
            "e2e-seccomp-control",
            "unshare -m true && echo seccomp-off || echo denied",
            config_extra='        seccomp = "default"',
        ),
    )
    assert out.split() == ["denied"], out


def test_default_seccomp_profile_applies_to_jobs(cluster: Any) -> None:
    out, _ = completed(
        cluster,
        job(
            "e2e-seccomp-default",
            "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; unshare -m true || echo denied",
        ),
    )
    assert "Seccomp:\t2" in out and "NoNewPrivs:\t1" in out and "denied" in out, out


def test_read_only_root_and_no_network_from_a_jobspec(cluster: Any) -> None:
    out, _ = completed(
        cluster,
        job(
            "e2e-ro-nonet",
            "touch /x 2>/dev/null || echo root-ro; echo hi > /local/f && echo local-rw; "
            "grep -c : /proc/net/dev",
            config_extra='        writable = "none"\n        network  = "none"',
        ),
    )
    # /proc/net/dev: the two header lines have no colon, each interface line has one.
    assert out.split() == ["root-ro", "local-rw", "1"], out


def test_bad_writable_value_is_refused_naming_the_option(cluster: Any) -> None:
    spec = job("e2e-bad-writable", "true", config_extra='        writable = "sometimes"')
    refused(cluster, spec, 'option \'writable\' = \'sometimes\': must be "tmpfs", "disk" or "none"')


def test_image_outside_the_plugins_image_dirs_is_refused(cluster: Any, tmp_path: Path) -> None:
    # The cluster's plugin config allows images under /var/lib/pyhpc/images only.
    spec = job("e2e-image-dirs", "true").replace(IMAGE, "/etc/passwd")
    refused(cluster, spec, "option 'image' = '/etc/passwd' is outside the plugin's image_dirs")


def test_mounts_and_devices_outside_the_allowlists_are_refused(cluster: Any) -> None:
    for name, extra, expected in [
        (
            "e2e-mount-denied",
            '        mounts = ["/etc:/hostetc:ro"]',
            "mounts: '/etc' is outside the plugin's mount_dirs",
        ),
        (
            "e2e-device-denied",
            '        devices = ["/dev/loop-control"]',
            "devices: '/dev/loop-control' is outside the plugin's allow_devices",
        ),
    ]:
        refused(cluster, job(name, "true", config_extra=extra), expected)


def image_mounts() -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith("/run/pyhpc/images/")
    ]


def image_loops() -> list[str]:
    return [
        p.parent.parent.name
        for p in Path("/sys/block").glob("loop*/loop/backing_file")
        if p.read_text().strip() == IMAGE
    ]


def test_tasks_share_one_remapped_image_mount_released_after_a_plugin_kill(
    cluster: Any,
) -> None:
    wait_for_go = (
        "cat /proc/self/uid_map; id -u; echo ready; while [ ! -e /alloc/go ]; do sleep 0.2; done"
    )
    a = cluster.run_job(job("e2e-share-a", wait_for_go))
    b = cluster.run_job(job("e2e-share-b", wait_for_go))
    try:
        alloc_a = running_alloc(cluster, a, "ready")
        alloc_b = running_alloc(cluster, b, "ready")
        # Root remapped as plugin-config/pyhpc.hcl says (root_id_range = "100000:65536").
        assert cluster.alloc_logs(alloc_a["ID"], "t").split()[:4] == ["0", "100000", "65536", "0"]
        assert len(image_mounts()) == 1 and len(image_loops()) == 1

        kill_plugin_and_await_recovery(cluster, alloc_a, alloc_b)
        release(cluster, alloc_a["ID"])
        cluster.wait_alloc(a, {"complete"})
        assert len(image_mounts()) == 1, "task b still runs on the image"
        release(cluster, alloc_b["ID"])
        cluster.wait_alloc(b, {"complete"})
        deadline = time.monotonic() + 10
        while image_mounts() or image_loops():
            assert time.monotonic() < deadline, (image_mounts(), image_loops())
            time.sleep(0.2)
    finally:
        cluster.stop_job(a)
        cluster.stop_job(b)


def test_task_with_reserved_cores_is_pinned_to_them(cluster: Any) -> None:
    spec = job("e2e-cores", "grep Cpus_allowed_list /proc/self/status").replace(
        "cpu    = 100", "cores  = 1"
    )
    out, _ = completed(cluster, spec)
    cpus = out.split()[-1]
    assert cpus.isdigit(), out  # one core, not a range or list
