"""One dataclass declaration gives the hclspec, the decoding and the checks."""

from __future__ import annotations

import pytest

from nomad_driver.driver.config import PluginConfig, TaskConfig
from nomad_driver.wire import cty, schema


def test_required_option_is_a_required_attr_and_defaults_carry_a_named_attr() -> None:
    spec = schema.hclspec(TaskConfig)
    attrs = spec.object.attributes
    assert attrs["image"].Attr.name == "image" and attrs["image"].Attr.required
    assert attrs["image"].Attr.type == "string"
    default = attrs["args"].default
    # Nomad's Default{} does not pass the object key down: an unnamed Attr breaks the agent.
    assert default.primary.Attr.name == "args"
    assert default.primary.Attr.type == "list(string)"
    assert default.default.literal.value == "[]"
    assert attrs["writable"].default.default.literal.value == '"tmpfs"'


def test_nomad_msgpack_decodes_into_the_dataclass_with_defaults() -> None:
    data = cty.encode(
        {"image": "/i.sqsh", "command": "/bin/echo", "args": ["a", "b"], "work_dir": None},
        schema.object_type(TaskConfig),
    )
    cfg = schema.load(TaskConfig, data, "task config")
    assert cfg == TaskConfig(image="/i.sqsh", command="/bin/echo", args=("a", "b"), work_dir="")


def test_every_problem_is_reported_with_its_option_name() -> None:
    data = cty.encode(
        {"image": "relative.sqsh", "command": None, "args": None, "writable": "sometimes"},
        schema.object_type(TaskConfig),
    )
    with pytest.raises(schema.ConfigError) as err:
        schema.load(TaskConfig, data, 'task "t" config')
    text = str(err.value)
    assert "option 'image' = 'relative.sqsh': expected an absolute SquashFS path or" in text
    assert "option 'writable' = 'sometimes': must be" in text
    assert text.startswith('invalid task "t" config')


def test_wrong_shape_from_the_wire_names_the_path() -> None:
    wrong = cty.encode(
        {"image": "/i", "command": "/c", "args": "x", "work_dir": None},
        cty.parse_type(
            "object({image = string, command = string, args = string, work_dir = string})"
        ),
    )
    with pytest.raises(schema.ConfigError, match="args"):
        schema.load(TaskConfig, wrong, "task config")


def test_mapping_input_rejects_unknown_options() -> None:
    with pytest.raises(schema.ConfigError, match="unknown option 'colour'"):
        schema.load(TaskConfig, {"image": "/i", "command": "c", "colour": "blue"}, "x")


def test_plugin_config_checks_durations_and_paths() -> None:
    assert schema.load(PluginConfig, b"", "plugin") == PluginConfig()
    with pytest.raises(schema.ConfigError) as err:
        schema.load(PluginConfig, {"run_dir": "/" + "d" * 100, "fingerprint_period": "soon"}, "p")
    assert "run_dir" in str(err.value) and "fingerprint_period" in str(err.value)


def test_readme_table_lists_every_option() -> None:
    table = schema.markdown_table(TaskConfig)
    for name in ("image", "command", "args", "work_dir"):
        assert f"| `{name}` |" in table


def test_path_list_options_name_the_paths_that_are_wrong() -> None:
    with pytest.raises(schema.ConfigError) as err:
        schema.load(PluginConfig, {"image_dirs": ["/ok", "rel"], "allow_devices": ["/etc"]}, "p")
    assert "['rel'] must be absolute paths under /" in str(err.value)
    assert "['/etc'] must be absolute paths under /dev/" in str(err.value)


def test_a_misspelt_option_gets_a_suggestion() -> None:
    with pytest.raises(
        schema.ConfigError, match="unknown option 'comand' \\(did you mean 'command'\\?\\)"
    ):
        schema.load(TaskConfig, {"image": "/i.sqsh", "comand": "x"}, "task config")
