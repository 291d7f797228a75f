"""CDI specs: which files are believed (root-owned, not group/other-writable, well formed,
of kind nvidia.com/gpu), what Reserve gives from them (by UUID or by NVML index; a spec's own
env winning), that their hooks never run, and that a device no spec describes is reserved as
without CDI. The specs are fixtures under tests/device/fixtures/cdi, copied into a temporary
directory with @ROOT@ standing for a temporary host tree; /dev/null is their device node."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from nomad_driver.device import cdi, nvml
from nomad_driver.device.service import DeviceConfig, DeviceService
from nomad_driver.proto import device_pb2
from tests.device.test_mig import LARGE, SMALL, Context, mig_gpus
from tests.device.test_nvml import recorded_nvml

FIXTURES = Path(__file__).parent / "fixtures" / "cdi"
H100_0, H100_1, L4 = "GPU-6f1c7a0e-000", "GPU-6f1c7a0e-001", "GPU-aa11"
ME = os.getuid()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A host tree the specs point into: a library, a socket stand-in, and a hook that would
    leave a mark if anything ran it."""
    host = tmp_path / "host"
    for sub in ("lib", "run", "bin"):
        (host / sub).mkdir(parents=True)
    (host / "lib" / "libcuda.so.1").write_bytes(b"\x7fELF")
    (host / "run" / "persistenced.sock").touch()
    hook = host / "bin" / "nvidia-cdi-hook"
    hook.write_text(f"#!/bin/sh\ntouch {host}/hook-ran\n")
    hook.chmod(0o755)
    return host


def skipped(caplog: pytest.LogCaptureFixture) -> list[tuple[str, ...]]:
    """The warnings as (message, path[, device], reason), from their hclog key-values."""
    return [(r.getMessage(), *r.__dict__["kv"].values()) for r in caplog.records]


def spec_dir(tmp_path: Path, root: Path, *names: str) -> Path:
    """A spec directory holding fixtures `names`, root-owned where the tests run as root
    (else the test's own uid stands for root), mode 0644."""
    where = tmp_path / "cdi"
    where.mkdir(mode=0o755, exist_ok=True)
    for name in names:
        text = (FIXTURES / name).read_text().replace("@ROOT@", str(root))
        (where / name).write_text(text)
        (where / name).chmod(0o644)
    return where


def test_only_trusted_well_formed_nvidia_specs_are_read_and_the_rest_named(
    tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = spec_dir(
        tmp_path, root, "nvidia-gpus.json", "malformed.json", "writable.json", "other-vendor.json"
    )
    (where / "writable.json").chmod(0o664)  # a group member could rewrite it: not policy
    (where / "notes.txt").write_text("not a spec")
    with caplog.at_level(logging.WARNING, logger="pyhpc.device"):
        specs = cdi.load((str(tmp_path / "absent"), str(where)), owner=ME)
    assert [s.path for s in specs] == [str(where / "nvidia-gpus.json")]
    # Device "2" names a regular file as its node: that entry alone is dropped.
    assert sorted(specs[0].devices) == ["0", "GPU-6f1c7a0e-001", "all"]
    warnings = skipped(caplog)
    malformed = [w for w in warnings if w[1] == f"{where}/malformed.json"]
    assert [w[0] for w in malformed] == ["CDI spec skipped"]
    assert malformed[0][2].startswith("not valid JSON: "), malformed
    assert (
        "CDI spec skipped",
        f"{where}/writable.json",
        "writable by group or others (mode 0664)",
    ) in warnings
    assert (
        "CDI device entry skipped",
        f"{where}/nvidia-gpus.json",
        "2",
        f"device node {root}/lib/libcuda.so.1 is not a character device on this host",
    ) in warnings
    assert len(warnings) == 3  # the other vendor's spec and the missing directory are no news


def test_a_spec_or_directory_owned_by_another_user_or_open_to_others_is_not_read(
    tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = spec_dir(tmp_path, root, "nvidia-gpus.json")
    with caplog.at_level(logging.WARNING, logger="pyhpc.device"):
        assert cdi.load((str(where),), owner=ME + 1) == []
        if ME == 0:  # only root can give a file away
            os.chown(where / "nvidia-gpus.json", 65534, -1)
            assert cdi.load((str(where),), owner=ME) == []
        where.chmod(0o777)
        assert cdi.load((str(where),), owner=ME) == []
    expected = [
        ("CDI directory skipped", str(where), f"owned by uid {ME}, not {ME + 1}"),
        ("CDI spec skipped", f"{where}/nvidia-gpus.json", "owned by uid 65534, not 0"),
        ("CDI directory skipped", str(where), "writable by group or others (mode 0777)"),
    ]
    assert skipped(caplog) == [w for w in expected if ME == 0 or "65534" not in w[2]]


def test_reserve_takes_a_described_devices_nodes_mounts_and_env_and_never_runs_hooks(
    tmp_path: Path, root: Path
) -> None:
    specs = cdi.load((str(spec_dir(tmp_path, root, "nvidia-gpus.json")),), owner=ME)
    gpus, _ = nvml.probe(recorded_nvml())
    given = cdi.injection(specs, gpus, [H100_0])  # named "0" in the spec: by NVML index
    assert given is not None
    assert given.nodes == (
        cdi.Node("/dev/null", "/dev/nvidiactl", "rw"),  # spec-wide first
        cdi.Node("/dev/null", "/dev/nvidia-uvm", "rwm"),
        cdi.Node("/dev/null", "/dev/nvidia0", "rw"),
    )
    assert given.mounts == (
        cdi.Mount(f"{root}/lib/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1", True),
        cdi.Mount(f"{root}/run/persistenced.sock", "/run/nvidia-persistenced/socket", False),
    )
    assert given.env == {
        "NVIDIA_VISIBLE_DEVICES": "void",  # the spec's own value wins over pyhpc's
        "CUDA_VISIBLE_DEVICES": H100_0,
        "GPU_SLOT": "0",
        # The update-ldcache hook is not run; the loader is told where the library is.
        "LD_LIBRARY_PATH": "/usr/lib/x86_64-linux-gnu",
    }
    assert given.sources == (str(tmp_path / "cdi" / "nvidia-gpus.json"),)
    assert not (root / "hook-ran").exists()
    assert "nvidia-cdi-hook" not in repr(given)

    both = cdi.injection(specs, gpus, [H100_0, H100_1])  # the second by its UUID
    assert both is not None
    assert [n.path for n in both.nodes] == [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia0",
        "/dev/nvidia1",
    ]
    # Every GPU of the node (these two): the spec's "all" entry.
    every = cdi.injection(specs, gpus[:2], [H100_1, H100_0])
    assert every is not None and [n.path for n in every.nodes][2:] == [
        "/dev/nvidia0",
        "/dev/nvidia1",
    ]
    assert every.env["CUDA_VISIBLE_DEVICES"] == f"{H100_1},{H100_0}"
    # The L4's entry was dropped; a reservation with it is left wholly to pyhpc's discovery.
    assert cdi.injection(specs, gpus, [L4]) is None
    assert cdi.injection(specs, gpus, [H100_0, L4]) is None
    assert cdi.injection([], gpus, [H100_0]) is None
    with pytest.raises(KeyError, match="unknown device IDs: GPU-nope"):
        cdi.injection(specs, gpus, ["GPU-nope"])
    assert not (root / "hook-ran").exists()


def reserve(service: DeviceService, ids: list[str]) -> Any:
    context: Any = Context()
    return service.Reserve(device_pb2.ReserveRequest(device_ids=ids), context).container_res


def test_the_plugin_reserves_from_cdi_where_it_describes_the_device_and_as_before_elsewhere(
    tmp_path: Path, root: Path
) -> None:
    where = spec_dir(tmp_path, root, "nvidia-gpus.json")
    fake = recorded_nvml()
    service = DeviceService(threading.Event(), probe=lambda: nvml.probe(fake), cdi_owner=ME)
    service.config = DeviceConfig(cdi_spec_dirs=(str(where),))
    service._look()
    res = reserve(service, [H100_1])
    assert [(d.task_path, d.host_path, d.permissions) for d in res.devices] == [
        ("/dev/nvidiactl", "/dev/null", "rw"),
        ("/dev/nvidia-uvm", "/dev/null", "rwm"),
        ("/dev/nvidia1", "/dev/null", "rw"),
    ]
    assert [(m.task_path, m.read_only) for m in res.mounts] == [
        ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", True),
        ("/run/nvidia-persistenced/socket", False),
    ]
    assert res.envs["GPU_SLOT"] == "1" and res.envs["CUDA_VISIBLE_DEVICES"] == H100_1
    # No spec entry for the L4: pyhpc's own nodes, libraries and env, as without CDI.
    own = reserve(service, [L4])
    assert own.devices[0].task_path == own.devices[0].host_path == "/dev/nvidia2"
    assert own.envs["LD_LIBRARY_PATH"] == nvml.TASK_LIB_DIR
    assert all(m.read_only for m in own.mounts)
    # CDI off (an empty list): the described GPU too is reserved as without CDI.
    service.config = DeviceConfig(cdi_spec_dirs=())
    assert [d.task_path for d in reserve(service, [H100_1]).devices][0] == "/dev/nvidia1"
    assert reserve(service, [H100_1]).devices[0].host_path == "/dev/nvidia1"
    assert not (root / "hook-ran").exists()


@pytest.mark.parametrize(
    ("edits", "problem"),
    [
        ({"env": ["NO_EQUALS"]}, "env entry 'NO_EQUALS' is not NAME=value"),
        ({"env": ["=x"]}, "is not NAME=value"),
        ({"deviceNodes": [{"path": "dev/nvidia0"}]}, "is not an absolute path"),
        ({"deviceNodes": [{"path": "/dev/../etc/shadow"}]}, "without '..'"),
        ({"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": "/nonexistent"}]}, "not a char"),
        (
            {"deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/null", "permissions": "rwx"}]},
            "r, w, m",
        ),
        ({"mounts": [{"hostPath": "/nonexistent", "containerPath": "/x"}]}, "does not exist"),
        ({"mounts": [{"hostPath": "/dev/null", "containerPath": "x"}]}, "is not an absolute"),
        ({"mounts": [{"hostPath": "/dev", "containerPath": "/x", "type": "tmpfs"}]}, "only bind"),
        ({"mounts": "/dev/null"}, "mounts is not a list"),
        ("env", "containerEdits is not a mapping"),
    ],
)
def test_container_edits_are_checked_before_they_are_believed(edits: Any, problem: str) -> None:
    with pytest.raises(cdi.SpecError, match=problem.replace("(", r"\(")):
        cdi.edits(edits)


def test_hooks_are_dropped_and_plain_edits_pass() -> None:
    hook = {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook", "args": []}
    assert cdi.edits({"hooks": [hook], "env": ["A=b=c"]}) == cdi.Edits(env=(("A", "b=c"),))
    assert cdi.edits(None) == cdi.Edits()


def test_yaml_specs_are_skipped_with_a_reason_where_pyyaml_is_missing(
    tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = spec_dir(tmp_path, root, "nvidia-mig.yaml")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml: ImportError
    with caplog.at_level(logging.WARNING, logger="pyhpc.device"):
        assert cdi.load((str(where),), owner=ME) == []
    assert skipped(caplog) == [
        (
            "CDI spec skipped",
            f"{where}/nvidia-mig.yaml",
            "a YAML spec, and PyYAML is not installed",
        )
    ]


def test_a_yaml_spec_describes_a_mig_device_by_gpu_and_mig_index(
    tmp_path: Path, root: Path
) -> None:
    pytest.importorskip("yaml", reason="PyYAML is optional: YAML specs are read where it is")
    specs = cdi.load((str(spec_dir(tmp_path, root, "nvidia-mig.yaml")),), owner=ME)
    gpus = mig_gpus()
    given = cdi.injection(specs, gpus, [SMALL])  # "0:0": GPU 0's MIG device 0
    assert given is not None
    assert [n.path for n in given.nodes] == [
        "/dev/nvidiactl",
        "/dev/nvidia-caps/nvidia-cap84",
        "/dev/nvidia-caps/nvidia-cap85",
    ]
    assert cdi.injection(specs, gpus, [LARGE]) is None  # "0:2" is not described


def test_mig_devices_and_whole_gpus_are_named_as_nvidia_ctk_names_them() -> None:
    gpus = mig_gpus()
    assert [cdi.names(g) for g in gpus] == [[SMALL, "0:0"], [LARGE, "0:2"], [L4, "1"]]
    assert cdi.names(gpus[0]._replace(nvml_index=-1)) == [SMALL]  # index unknown: UUID only


def test_a_spec_symlinked_from_the_directory_is_checked_as_the_file_it_names(
    tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = spec_dir(tmp_path, root)
    elsewhere = tmp_path / "elsewhere.json"
    shutil.copy(FIXTURES / "writable.json", elsewhere)
    elsewhere.chmod(0o666)
    (where / "linked.json").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="pyhpc.device"):
        assert cdi.load((str(where),), owner=ME) == []
    assert skipped(caplog) == [
        ("CDI spec skipped", f"{where}/linked.json", "writable by group or others (mode 0666)")
    ]
