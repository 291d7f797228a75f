"""The `pyhpc` command line."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

VAR_PREFIX = "NOMAD_VAR_"


def pairs(items: list[str], flag: str, shape: str = "KEY=VALUE") -> dict[str, str]:
    """Repeated `--flag KEY=VALUE` arguments as a mapping; ValueError naming the first that is
    not of that shape."""
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected {shape}")
        found[key] = value
    return found


def add_var_flags(parser: Any) -> None:
    """-var and -var-file, as `nomad job run` spells them; job_variables reads them."""
    parser.add_argument(
        "-var", "--var", action="append", default=[], metavar="NAME=VALUE",
        help="an input variable, as `nomad job run -var` (NOMAD_VAR_NAME works too)",
    )  # fmt: skip
    parser.add_argument(
        "-var-file", "--var-file", action="append", default=[], metavar="FILE",
        help="a variables file, as `nomad job run -var-file` (repeat; later files win)",
    )  # fmt: skip


def job_variables(
    var: list[str], var_files: list[str], environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """A jobspec's input variables as `nomad job run` takes them, later winning: NOMAD_VAR_name
    in the environment, then each -var-file in order (HCL), then each -var NAME=VALUE. ValueError
    in one line naming the flag or file that is wrong."""
    import hcl2

    from nomad_driver.driver.jobspec import _OPTIONS

    found: dict[str, Any] = {
        k[len(VAR_PREFIX) :]: v for k, v in environ.items() if k.startswith(VAR_PREFIX)
    }
    for path in var_files:
        try:
            with open(path, encoding="utf-8") as f:
                parsed = hcl2.loads(f.read(), serialization_options=_OPTIONS)
        except OSError as err:
            raise ValueError(f"-var-file {path}: {err.strerror}") from err
        except Exception as err:  # noqa: BLE001 - the parser raises many types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"-var-file {path}: not a variables file ({first})") from err
        found.update({k: v for k, v in parsed.items() if not k.startswith("__")})
    found.update(pairs(var, "-var", "NAME=VALUE"))
    return found


def variables_file(values: Mapping[str, Any]) -> str:
    """The variables as the content of a variables file (JSON values are HCL expressions)."""
    return "".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items())
