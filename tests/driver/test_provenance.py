"""The provenance record keeps no value a reader could not see already (red team: template
and Vault secrets under names such as DB_PASS or DATABASE_URL reached alloc/logs)."""

from __future__ import annotations

from nomad_driver.driver import provenance

SECRETS = {
    "DB_PASS": "hunter2-from-template",
    "DATABASE_URL": "postgres://app:s3cr3t@db/app",
    "MY_SECRET_FILE": "inline-secret-value",
    "MYSQL_PWD": "pw",
}


def test_only_values_already_visible_are_recorded_and_never_secret_named_ones() -> None:
    env = {**SECRETS, "OMP_NUM_THREADS": "8", "SITE_TOKEN": "t", "PATH": "/bin"}
    kept = provenance.environment(env, {"OMP_NUM_THREADS", "SITE_TOKEN"}.__contains__)
    assert kept["env"] == {"OMP_NUM_THREADS": "8", "PATH": "/bin"}
    assert kept["env_withheld"] == sorted([*SECRETS, "SITE_TOKEN"])
    text = repr(kept)
    assert not any(value in text for value in SECRETS.values())
