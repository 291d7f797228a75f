"""`pyhpc run --config` reads a real Nomad agent configuration: an HCL1 or JSON file, or a
directory such as /etc/nomad.d, and takes the `plugin "pyhpc"` block from it."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from nomad_driver.cli import run
from nomad_driver.driver import agentconfig
from nomad_driver.wire import schema
from tests.cli.test_run import pyhpc_run

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NOMAD_D = FIXTURES / "nomad.d"
REPO = Path(__file__).resolve().parents[2]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="pyhpc run and its cache need root")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own policy cache, so none reads an entry another test (or the host) left."""
    cache = tmp_path / "policy-cache"
    monkeypatch.setattr(run, "POLICY_CACHE", str(cache))
    return cache


def copy_of_nomad_d(tmp_path: Path) -> Path:
    copy = tmp_path / "nomad.d"
    shutil.copytree(NOMAD_D, copy)
    return copy


def test_a_client_file_with_hcl1_quoted_keys_gives_its_pyhpc_block(tmp_path: Path) -> None:
    base = (NOMAD_D / "00-base.hcl").read_text()
    assert '"driver.denylist"' in base  # a quoted key: what python-hcl2 refused
    assert run.load_policy(str(NOMAD_D / "00-base.hcl")).root_id_range == "100000:65536"
    client = tmp_path / "client.hcl"
    client.write_text(base + (NOMAD_D / "10-pyhpc.hcl").read_text())
    plugin = run.load_policy(str(client))
    assert plugin.root_id_range == "200000:65536"
    assert plugin.pids_max == 4096
    assert plugin.image_dirs == ("/var/lib/pyhpc/images", "/srv/hpc/images")
    assert plugin.allow_caps[-1] == "SYS_PTRACE"


def test_a_directory_is_read_as_the_agent_reads_it() -> None:
    names = [os.path.basename(f) for f in agentconfig.config_files(str(NOMAD_D))]
    assert names == ["00-base.hcl", "05-telemetry.json", "10-pyhpc.hcl"]  # not nomad.env
    plugin = run.load_policy(str(NOMAD_D))
    assert (plugin.root_id_range, plugin.pids_max) == ("200000:65536", 4096)
    assert plugin.mount_dirs == ("/scratch", "/home")


def test_nomads_json_form_decodes_like_hcl() -> None:
    plugin = run.load_policy(str(FIXTURES / "agent.json"))
    assert plugin.image_dirs == ("/srv/hpc/images",)
    assert (plugin.pids_max, plugin.root_id_range) == (2048, "300000:65536")


def test_the_shipped_plugin_config_decodes_its_lists_as_before() -> None:
    plugin = run.load_policy(str(REPO / "plugin-config" / "pyhpc.hcl"))
    assert plugin.image_dirs == ("/var/lib/pyhpc/images",)
    assert plugin.image_sources == () and plugin.mount_dirs == ()
    assert len(plugin.allow_caps) == 14 and plugin.allow_caps[-1] == "SYS_CHROOT"
    assert plugin.seccomp_profile_dirs == ("/etc/pyhpc/seccomp",)
    assert plugin.fingerprint_period == "30s" and plugin.user_namespace is True


def test_a_later_file_replaces_the_pyhpc_block_whole(tmp_path: Path) -> None:
    nomad_d = copy_of_nomad_d(tmp_path)
    (nomad_d / "20-override.json").write_text(
        json.dumps({"plugin": {"pyhpc": {"config": {"pids_max": 99}}}})
    )
    (nomad_d / "30-empty.hcl").write_text('plugin "pyhpc" {}\n')  # no config: changes nothing
    plugin = run.load_policy(str(nomad_d))
    assert plugin.pids_max == 99
    assert plugin.root_id_range == "100000:65536"  # 10-pyhpc.hcl's block is replaced, not merged


def test_a_bad_option_names_the_file_its_block_came_from(tmp_path: Path) -> None:
    nomad_d = copy_of_nomad_d(tmp_path)
    (nomad_d / "10-pyhpc.hcl").write_text('plugin "pyhpc" {\n  config {\n    pids_mx = 1\n  }\n}\n')
    with pytest.raises(schema.ConfigError) as err:
        run.load_policy(str(nomad_d))
    assert str(err.value).startswith(f"invalid {nomad_d}/10-pyhpc.hcl: unknown option 'pids_mx'")


def test_a_syntax_error_is_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    nomad_d = copy_of_nomad_d(tmp_path)
    bad = nomad_d / "20-bad.hcl"
    bad.write_text('plugin "pyhpc" {\n  config {\n    pids_max =\n  }\n}\n')
    with pytest.raises(schema.ConfigError) as err:
        run.load_policy(str(nomad_d))
    assert str(err.value) == f"invalid {bad}:4:3: not valid HCL: unexpected '}}'"
    bad.write_text('{\n  "plugin": {\n    "pyhpc": \n}\n')
    bad.rename(nomad_d / "20-bad.json")
    with pytest.raises(schema.ConfigError) as err:
        run.load_policy(str(nomad_d))
    assert str(err.value) == f"invalid {nomad_d}/20-bad.json:4:1: not valid JSON: Expecting value"


@as_root
def test_pyhpc_run_reports_a_broken_config_in_one_line(tmp_path: Path) -> None:
    nomad_d = copy_of_nomad_d(tmp_path)
    (nomad_d / "20-bad.hcl").write_text('client {\n  options {\n    "a" = \n  }\n}\n')
    empty = tmp_path / "empty.d"
    empty.mkdir()
    (empty / "README").write_text("not a config\n")
    latin1 = copy_of_nomad_d(tmp_path / "latin1")
    (latin1 / "20-meta.hcl").write_bytes(b'client {\n  meta {\n    "owner" = "J\xf6rg"\n  }\n}\n')
    dangling = copy_of_nomad_d(tmp_path / "dangling")
    (dangling / "20-gone.hcl").symlink_to(tmp_path / "gone.hcl")
    for config, line in (
        (nomad_d, f"invalid {nomad_d}/20-bad.hcl:4:3: not valid HCL: unexpected '}}'"),
        (empty, f"invalid {empty}: no *.hcl or *.json agent configuration files in it"),
        (latin1, f"invalid {latin1}/20-meta.hcl:3: not UTF-8 text"),
        (dangling, f"{dangling}/20-gone.hcl: No such file or directory"),
        (tmp_path / "absent.hcl", f"{tmp_path}/absent.hcl: No such file or directory"),
    ):
        done = pyhpc_run("--config", str(config), "/var/lib/pyhpc/images/none.sqsh", "true")
        assert done.returncode == 125, done
        assert done.stderr.splitlines() == [f"pyhpc run: {line}"]


@as_root
def test_the_cache_of_a_directory_sees_a_change_to_any_of_its_files(
    tmp_path: Path, private_cache: Path
) -> None:
    nomad_d = copy_of_nomad_d(tmp_path)
    assert run.load_policy(str(nomad_d)).pids_max == 4096  # parsed, and now cached
    (entry,) = private_cache.iterdir()
    forged = json.loads(entry.read_text())
    forged["options"]["pids_max"] = 7
    entry.write_text(json.dumps(forged))
    assert run.load_policy(str(nomad_d)).pids_max == 7  # control: the cache is read
    time.sleep(0.01)  # a new mtime even on coarse clocks
    pyhpc = nomad_d / "10-pyhpc.hcl"
    pyhpc.write_text(pyhpc.read_text().replace("4096", "4097"))  # in place: same inode
    assert run.load_policy(str(nomad_d)).pids_max == 4097
    (nomad_d / "20-more.hcl").write_text('plugin "pyhpc" { config { pids_max = 5 } }\n')
    assert run.load_policy(str(nomad_d)).pids_max == 5
    (nomad_d / "20-more.hcl").unlink()
    assert run.load_policy(str(nomad_d)).pids_max == 4097


@as_root
def test_pyhpc_run_with_an_agent_config_directory_obeys_its_pyhpc_block(
    busybox_image: Path,
) -> None:
    mapped = pyhpc_run("--config", str(NOMAD_D), str(busybox_image), "cat", "/proc/self/uid_map")
    assert mapped.returncode == 0, mapped.stderr
    assert mapped.stdout.split() == ["0", "200000", "65536"]  # the fixture's root_id_range
    ptrace = ("--cap-add", "SYS_PTRACE", str(busybox_image), "true")
    allowed = pyhpc_run("--config", str(NOMAD_D), *ptrace)
    assert allowed.returncode == 0, allowed.stderr  # the fixture's allow_caps has it
    base = str(NOMAD_D / "00-base.hcl")  # control: no pyhpc block, so every default
    refused = pyhpc_run("--config", base, *ptrace)
    assert refused.returncode == 125
    assert "cap_add: SYS_PTRACE not in the plugin's allow_caps" in refused.stderr
