"""pyhpc on a secured federation (tests/e2e/securebed.py): dispatch and job sync with mutual
TLS, ACL tokens and a namespace across two regions; a task's service registered in Consul
over TLS with ACLs; a signed image verified by the plugin with Vault over TLS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from securebed import NAMESPACE, REGIONS, SIGNED_DIR, SIGNING_KEY, SecureBed
from test_foundation import IMAGE, json_str

BOTH = [a for r in REGIONS for a in ("--region", r)]


def job(name: str, script: str, *, kind: str = "batch", image: str = IMAGE, extra: str = "") -> str:
    return f"""
job "{name}" {{
  datacenters = ["*"]
  namespace   = "{NAMESPACE}"
  type        = "{kind}"
{extra}
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    task "t" {{
      driver = "pyhpc"
      config {{
        image   = "{image}"
        command = "/bin/sh"
        args    = ["-c", {json_str(script)}]
      }}
      resources {{
        cpu    = 100
        memory = 64
      }}
    }}
  }}
}}
"""


PARAMETERIZED = job(
    "secured",
    'echo "said ${NOMAD_META_word} in ${NOMAD_REGION}"',
    extra='  parameterized {\n    meta_required = ["word"]\n  }',
)
DISPATCH_ONLY = f"""
namespace "{NAMESPACE}" {{
  capabilities = ["dispatch-job", "read-job", "list-jobs", "read-logs"]
}}
"""
READ_ONLY = f"""
namespace "{NAMESPACE}" {{
  capabilities = ["read-job", "list-jobs"]
}}
"""


def pyhpc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def secured(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBed]:
    bins = {"nomad": cluster.nomad_bin, "consul": cluster.consul_bin}
    bed = SecureBed(tmp_path_factory.mktemp("secured"), bins, cluster.state_dir / "plugins")
    try:
        bed.up()
        spec = bed.root / "secured.nomad"
        spec.write_text(PARAMETERIZED)
        for region in REGIONS:  # an operator registers it; the dispatcher only dispatches
            bed.nomad("job", "run", "-region", region, str(spec))
        yield bed
    finally:
        bed.down()


def wait_done(bed: SecureBed, name: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        allocs = json.loads(bed.nomad("job", "allocs", "-namespace", NAMESPACE, "-json", name))
        done = [a for a in allocs if a["ClientStatus"] in ("complete", "failed")]
        if done:
            return dict(done[0])
        assert time.monotonic() < deadline, f"{name}: {allocs}"
        time.sleep(1)


def test_dispatch_across_both_regions_with_a_dispatch_only_token(secured: SecureBed) -> None:
    token = secured.token_for("dispatch-hpc", DISPATCH_ONLY)
    env = {**secured.tls_env(token), "NOMAD_NAMESPACE": NAMESPACE}
    done = pyhpc(
        env, "dispatch", "secured", *BOTH, "--count", "2", "--meta", "word=hello",
        "--output", "--no-copy", "--timeout", "180",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for region in REGIONS:
        assert f"said hello in {region}" in done.stdout, done.stdout
    assert "2 of 2 completed successfully (1 in secure, 1 in secure2)" in done.stdout
    # The same with the flags of Nomad's CLI instead of the environment.
    flags = [
        f"-address={env['NOMAD_ADDR']}", f"-token={token}", f"-namespace={NAMESPACE}",
        f"-ca-cert={env['NOMAD_CACERT']}", f"-client-cert={env['NOMAD_CLIENT_CERT']}",
        f"-client-key={env['NOMAD_CLIENT_KEY']}",
    ]  # fmt: skip
    again = pyhpc({"PATH": "/usr/bin:/bin"}, "dispatch", "secured", *flags, "-region", "secure2",
                  "--meta", "word=again", "--no-copy")  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_token_without_dispatch_is_refused_with_nomads_403_named(secured: SecureBed) -> None:
    token = secured.token_for("read-hpc", READ_ONLY)
    env = {**secured.tls_env(token), "NOMAD_NAMESPACE": NAMESPACE}
    done = pyhpc(
        env, "dispatch", "secured", "--region", "secure2", "--meta", "word=no", "--no-copy"
    )
    message = done.stdout + done.stderr
    assert done.returncode != 0
    assert "HTTP 403" in message and "namespace hpc" in message and "NOMAD_TOKEN" in message
    assert "Traceback" not in message, message


def test_without_a_certificate_one_line_says_what_to_check(secured: SecureBed) -> None:
    env = {**secured.tls_env(secured.management), "NOMAD_NAMESPACE": NAMESPACE}
    for missing in ("NOMAD_CLIENT_CERT", "NOMAD_CACERT"):
        partial = {k: v for k, v in env.items() if k != missing}
        done = pyhpc(partial, "dispatch", "secured", "--meta", "word=x")
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1, done.stderr
        assert f"Nomad at {env['NOMAD_ADDR']}" in lines[0], lines
    # The control: with both, the same call gets through.
    ok = pyhpc(env, "dispatch", "secured", "--meta", "word=x", "--no-follow", "--no-copy")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_job_sync_plans_and_registers_in_both_regions(secured: SecureBed, tmp_path: Path) -> None:
    env = {**secured.tls_env(secured.management), "NOMAD_NAMESPACE": NAMESPACE}
    spec = tmp_path / "secured.nomad"
    spec.write_text(PARAMETERIZED.replace("memory = 64", "memory = 96"))
    dry = pyhpc(env, "job", "sync", str(spec), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert dry.stdout.count("MemoryMB: '64' => '96'") == 2, dry.stdout
    done = pyhpc(env, "job", "sync", str(spec))
    assert done.returncode == 0, done.stdout + done.stderr
    for region in REGIONS:
        assert f"region {region}: registered" in done.stdout, done.stdout
        found = json.loads(
            secured.nomad("job", "inspect", "-region", region, "-namespace", NAMESPACE, "secured")
        )
        assert found["Job"]["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMB"] == 96


def test_a_tasks_service_is_registered_in_consul_over_tls_with_acls(secured: SecureBed) -> None:
    name = "secured-web"
    spec = secured.root / "web.nomad"
    spec.write_text(
        job("web", "echo up; exec sleep 600", kind="service").replace(
            '    task "t" {',
            '    network {\n      port "http" {}\n    }\n'
            f'    service {{\n      name     = "{name}"\n      provider = "consul"\n'
            '      port     = "http"\n    }\n    task "t" {',
        )
    )
    secured.nomad("job", "run", "-detach", str(spec))
    try:
        deadline = time.monotonic() + 90
        while not secured.consul("GET", f"/v1/catalog/service/{name}"):
            assert time.monotonic() < deadline, secured.log_tails()
            time.sleep(1)
        entry = secured.consul("GET", f"/v1/catalog/service/{name}")[0]
        assert entry["ServicePort"] > 0
    finally:
        secured.nomad("job", "stop", "-namespace", NAMESPACE, "-purge", "-detach", "web")


def test_a_signed_image_is_verified_with_vault_over_tls(secured: SecureBed) -> None:
    from nomad_driver.signing.verify import sign

    SIGNED_DIR.mkdir(mode=0o755, exist_ok=True)
    signed, unsigned = SIGNED_DIR / "signed.sqsh", SIGNED_DIR / "unsigned.sqsh"
    for path in (signed, unsigned):
        shutil.copyfile(IMAGE, path)
        os.chmod(path, 0o644)
    # The same bytes: the signature is the envelope beside the signed file, and only there.
    sign(secured.vault(), str(signed), str(signed), SIGNING_KEY)
    for name, image in (("signed", signed), ("unsigned", unsigned)):
        spec = secured.root / f"{name}.nomad"
        spec.write_text(job(name, "echo ran", image=str(image)))
        secured.nomad("job", "run", "-detach", str(spec))
    ran = wait_done(secured, "signed")
    assert ran["ClientStatus"] == "complete", ran
    events = " ".join(
        e.get("DisplayMessage", "")
        for e in json.loads(
            secured.nomad("alloc", "status", "-namespace", NAMESPACE, "-json", ran["ID"])
        )["TaskStates"]["t"]["Events"]
    )
    assert f"transit/{SIGNING_KEY} v1" in events, events
    refused = wait_done(secured, "unsigned")
    assert refused["ClientStatus"] == "failed", refused
    status = secured.nomad("alloc", "status", "-namespace", NAMESPACE, refused["ID"])
    assert "signature" in status, status
