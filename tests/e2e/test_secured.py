"""pyhpc on a secured federation (tests/e2e/securebed.py): dispatch and job sync with mutual
TLS, ACL tokens and a namespace across two regions; a task's service registered in Consul
over TLS with ACLs; a signed image verified by the plugin with Vault over TLS; an MPI job
across two secured nodes meeting through Consul over TLS, its remote shell presenting a client
certificate."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from securebed import NAMESPACE, REGIONS, SIGNED_DIR, SIGNING_KEY, SecureBed
from test_foundation import IMAGE
from test_foundation import job as foundation_job
from test_mpi import mpi_image  # noqa: F401 - the fixture that builds the MPI image
from test_mpi_multi import SPEC as MPI_SPEC
from test_mpi_multi import ranks

from nomad_driver.federation.nomad import Nomad, Settings

REPO = Path(__file__).resolve().parents[2]
BOTH = [a for r in REGIONS for a in ("--region", r)]


def job(name: str, script: str, *, kind: str = "batch", image: str = IMAGE, extra: str = "") -> str:
    return foundation_job(
        name, script, type_=kind, image=image, job_extra=f'  namespace = "{NAMESPACE}"\n{extra}'
    )


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


MPI_LAUNCHER = f"""
namespace "{NAMESPACE}" {{
  capabilities = ["read-job", "alloc-exec", "alloc-lifecycle"]
}}
"""


@pytest.fixture(scope="module")
def mpi_pool(secured: SecureBed, mpi_image: str) -> Iterator[SecureBed]:  # noqa: F811
    secured.mpi_nodes_up(2)
    try:
        yield secured
    finally:
        for name in ("secured-mpi", "secured-mpi-nocert"):
            secured.nomad("job", "stop", "-namespace", NAMESPACE, "-purge", name, check=False)
        secured.mpi_nodes_down()


def submit_mpi(bed: SecureBed, name: str, *variables: str) -> None:
    """mpi-multi as job NAME in the namespace, with Consul as its rendezvous."""
    spec = bed.root / f"{name}.nomad"
    head = f'job "{name}" {{\n  namespace = "{NAMESPACE}"'
    spec.write_text(MPI_SPEC.read_text().replace('job "mpi-multi" {', head))
    args = [a for v in ("service_provider=consul", *variables) for a in ("-var", v)]
    bed.nomad("job", "run", "-detach", *args, str(spec))


def mpi_allocs(bed: SecureBed, name: str) -> list[dict[str, Any]]:
    return list(json.loads(bed.nomad("job", "allocs", "-namespace", NAMESPACE, "-json", name)))


def launcher_end(bed: SecureBed, name: str) -> tuple[dict[str, Any], str, str]:
    """The launcher's allocation, stdout and stderr, once it ended."""
    deadline = time.monotonic() + 180
    while True:
        ended = [
            a
            for a in mpi_allocs(bed, name)
            if a["TaskGroup"] == "launcher" and a["ClientStatus"] in ("complete", "failed")
        ]
        if ended:
            break
        assert time.monotonic() < deadline, f"{name}: {mpi_allocs(bed, name)}\n{bed.log_tails()}"
        time.sleep(1)
    time.sleep(1)  # the last lines reach the log after the task's end

    def log(kind: str) -> str:
        # Through the server: the node's own address is inside its network namespace.
        query = f"task=launcher&type={kind}&plain=true&origin=start&offset=0&namespace={NAMESPACE}"
        path = f"/v1/client/fs/logs/{ended[0]['ID']}?{query}"
        return bed.nomad("operator", "api", path, check=False)

    return ended[0], log("stdout"), log("stderr")


def test_mpi_across_two_secured_nodes_meets_through_consul_over_tls(mpi_pool: SecureBed) -> None:
    bed, c = mpi_pool, mpi_pool.certs
    assert bed.mpi_node_names() == ["secure-mpi-1", "secure-mpi-2"]
    # Without a client certificate, the launcher's remote shell cannot reach Nomad's exec API
    # on agents that verify HTTPS clients: it says so before mpirun starts.
    submit_mpi(bed, "secured-mpi-nocert")
    stub, out, err = launcher_end(bed, "secured-mpi-nocert")
    assert stub["ClientStatus"] == "failed", out + err
    assert "cannot reach worker allocation" in err and "https://127.0.0.1:4646" in err, err
    assert "x509: certificate signed by unknown authority" in err, err
    assert "needs NOMAD_CACERT" in err and "-var nomad_tls=" in err, err
    assert "hello from" not in out, out + err
    # The certificate as a site hands it out: a Nomad Variable that only this job's workload
    # identity (and operators) may read; the rights for the exec: a policy linked to the task.
    name = "secured-mpi"
    bed.nomad(
        "var", "put", "-namespace", NAMESPACE, f"nomad/jobs/{name}",
        f"ca=@{c / 'nomad-agent-ca.pem'}", f"cert=@{c / 'secure-cli-nomad.pem'}",
        f"key=@{c / 'secure-cli-nomad-key.pem'}",
    )  # fmt: skip
    policy = bed.root / "mpi-launcher.hcl"
    policy.write_text(MPI_LAUNCHER)
    bed.nomad("acl", "policy", "apply", "-namespace", NAMESPACE, "-job", name,
              "-group", "launcher", "-task", "launcher", "mpi-launcher", str(policy))  # fmt: skip
    submit_mpi(bed, name, f"nomad_tls=nomad/jobs/{name}")
    # The workers meet the launcher in Consul's catalog (read here over TLS, with a token).
    deadline = time.monotonic() + 90
    while True:
        found = {
            e["ServiceAddress"]: e["ServiceTags"]
            for e in bed.consul("GET", f"/v1/catalog/service/{name}-workers")
        }
        if len(found) == 2:
            break
        assert time.monotonic() < deadline, (found, mpi_allocs(bed, name), bed.log_tails())
        time.sleep(0.2)
    assert sorted(found) == ["10.98.0.1", "10.98.0.2"], found
    workers = {a["ID"] for a in mpi_allocs(bed, name) if a["TaskGroup"] == "worker"}
    assert {t for tags in found.values() for t in tags} == workers, found
    stub, out, err = launcher_end(bed, name)
    assert stub["ClientStatus"] == "complete", out + err
    assert "pyhpc-mpi: 2 workers ready" in err, err
    seen = ranks(out, "hello from")
    assert sorted(seen) == [0, 1, 2, 3], out
    assert sorted(seen.values()) == ["secure-mpi-1"] * 2 + ["secure-mpi-2"] * 2, out
    # Nomad's own catalog was not used.
    listed = bed.nomad("service", "list", "-namespace", NAMESPACE, "-json")
    assert f"{name}-workers" not in listed, listed


def guide_commands(section: str) -> list[list[str]]:
    """The commands of the first console block under SECTION of the user guide, as written
    (comments dropped)."""
    text = (REPO / "docs" / "user.md").read_text()
    block = text.split(f"\n## {section}\n", 1)[1].split("```console\n", 1)[1].split("```", 1)[0]
    commands: list[list[str]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            commands.append(shlex.split(line[2:], comments=True))
    return commands


def dispatched(bed: SecureBed) -> int:
    """hpc's dispatched instances in every region, asked through pyhpc's own Nomad client with
    the operator's NOMAD_* (mutual TLS, token)."""
    nomad = Nomad(Settings.from_env(bed.tls_env(bed.management)))
    return sum(
        len(nomad.call("GET", "/v1/jobs", r, params={"prefix": "hpc/dispatch-"})) for r in REGIONS
    )


def test_the_federation_guide_runs_as_written_on_the_secured_bed(secured: SecureBed) -> None:
    """docs/user.md's federation commands, in an operator's shell holding the secured bed's
    NOMAD_* (certificates and a token), with its second region named secure2, not east."""
    commands = guide_commands("Federation: dispatch and job sync")
    assert [c[:2] for c in commands] == [["nomad", "job"]] + [["pyhpc", "dispatch"]] * 5, commands
    env = secured.tls_env(secured.management)
    before_retry = -1
    try:
        for argv in commands:
            if argv is commands[-1]:
                before_retry = dispatched(secured)
            argv = ["secure2" if a == "east" else a for a in argv]
            program = (
                [str(secured.bins["nomad"])]
                if argv[0] == "nomad"
                else [sys.executable, "-m", "nomad_driver.cli.main"]
            )
            done = subprocess.run(
                program + argv[1:], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
            said = done.stdout + done.stderr
            assert done.returncode == 0, f"{' '.join(argv)}: {said}"
            if "--output" in argv:
                assert "size=1000000 sum=500000500000" in done.stdout, said
            if "--count" in argv:
                count = argv[argv.index("--count") + 1]
                assert f"{count} of {count} completed successfully" in done.stdout, said
        # The retry with the same idempotency token found every instance and dispatched none.
        assert commands[-1] == commands[-2] and "--idempotency-token" in commands[-1]
        assert dispatched(secured) == before_retry > 0
    finally:
        for region in REGIONS:
            secured.nomad("job", "stop", "-region", region, "-purge", "hpc", check=False)
