"""The admin's policy applied to a task config: refusals name what was wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_driver.driver import config, policy
from nomad_driver.runtime.security import PolicyError
from nomad_driver.wire import schema


def plugin(**options: object) -> config.PluginConfig:
    return schema.load(config.PluginConfig, options, "test")


def test_a_missing_device_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="devices: '/dev/nonexistent0' does not exist"):
        policy.allowed_binds(("/dev/nonexistent0",), ("/dev",), "devices", "allow_devices")


def test_a_file_that_is_not_a_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is not a device"):
        policy.allowed_binds(("/dev/shm",), ("/dev",), "devices", "allow_devices")


def test_image_outside_image_dirs_and_missing_image(tmp_path: Path) -> None:
    cfg = plugin(image_dirs=[str(tmp_path / "images")])
    with pytest.raises(PolicyError, match="outside the plugin's image_dirs"):
        policy.checked_image(cfg, "/etc/passwd")
    with pytest.raises(FileNotFoundError, match="no such file"):
        policy.checked_image(cfg, str(tmp_path / "images" / "absent.sqsh"))


def test_user_namespace_settings_reach_the_spec(tmp_path: Path) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"x")
    task = schema.load(config.TaskConfig, {"image": str(image), "command": "true"}, "t")
    ctx = policy.TaskContext("t1", "host", {}, "", "/dev/null", "/dev/null")
    on = policy.container_spec(plugin(root_id_range="200000:1000"), task, str(image), ctx)
    off = policy.container_spec(plugin(user_namespace=False), task, str(image), ctx)
    assert (on.userns, off.userns) == ((200000, 1000), None)
    with pytest.raises(schema.ConfigError, match="root_id_range"):
        plugin(root_id_range="0:65536")


def test_new_plugin_options_refuse_nonsense_naming_each() -> None:
    bad = {
        "vault_address": "vault:8200",
        "vault_transit_mount": "/",
        "vault_auth": "kerberos",
        "vault_token_file": "relative/token",
        "signature_mode": "strict",
        "signature_rules": ["docker://r/=maybe"],
        "signature_key_ttl": "soon",
        "image_zstd_level": 40,
        "store_max_mb": -1,
        "root_id_range": "0:65536",
        "store_dir": "store",
    }
    with pytest.raises(schema.ConfigError) as err:
        plugin(**bad)
    for name in bad:
        assert f"option {name!r}" in str(err.value), name
