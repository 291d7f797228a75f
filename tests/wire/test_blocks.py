"""A nested block (`mpi { ... }` in a task config): in the hclspec Nomad decodes against, in
Nomad's msgpack (present and absent), and in python-hcl2's shape, with its own checks."""

from __future__ import annotations

import pytest

from nomad_driver.driver.config import MpiConfig, TaskConfig
from nomad_driver.wire import cty, schema


def test_the_hclspec_declares_mpi_as_a_block_with_its_own_defaults() -> None:
    spec = schema.hclspec(TaskConfig).object.attributes["mpi"]
    assert spec.WhichOneof("block") == "block_value"
    assert spec.block_value.name == "mpi" and not spec.block_value.required
    nested = spec.block_value.nested.object.attributes
    assert nested["implementation"].Attr.required
    assert nested["ranks_per_node"].default.default.literal.value == "1"


def test_nomads_msgpack_with_and_without_the_block() -> None:
    whole = schema.object_type(TaskConfig)
    absent = cty.encode({"image": "/i.sqsh"}, whole)
    assert schema.load(TaskConfig, absent, "t").mpi is None
    present = cty.encode(
        {
            "image": "/i.sqsh",
            "mpi": {
                "implementation": "mpich",
                "ranks_per_node": 4,
                "launcher": "",
                "launcher_args": [],
            },
        },
        whole,
    )
    assert schema.load(TaskConfig, present, "t").mpi == MpiConfig("mpich", 4, "", ())


def test_hcl2_shape_and_the_blocks_own_checks() -> None:
    cfg = schema.load(TaskConfig, {"image": "/i.sqsh", "mpi": [{"implementation": "openmpi"}]}, "t")
    assert cfg.mpi == MpiConfig("openmpi", 1, "", ())
    with pytest.raises(schema.ConfigError) as err:
        schema.load(
            TaskConfig,
            {"image": "/i.sqsh", "mpi": [{"implementation": "lam", "ranks_per_node": 0}]},
            "t",
        )
    assert err.value.problems == [
        "mpi block: option 'implementation' = 'lam': must be \"openmpi\" or \"mpich\"",
        "mpi block: option 'ranks_per_node' = 0: must be a whole number 1-4096",
    ]
    with pytest.raises(schema.ConfigError, match="at most one mpi block, not 2"):
        schema.load(TaskConfig, {"image": "/i.sqsh", "mpi": [{}, {}]}, "t")
