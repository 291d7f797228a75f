"""Every fuzz target on its committed corpus (crashers found earlier stay here as regression
tests) and on a short burst of generated input."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.corpus import tar_layers
from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"


def corpus(name: str) -> list[Path]:
    return sorted((CORPUS / name).glob("*")) if (CORPUS / name).is_dir() else []


@pytest.mark.parametrize(
    ("name", "path"),
    [(name, path) for name in TARGETS for path in corpus(name)],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_corpus_input_is_handled(name: str, path: Path) -> None:
    TARGETS[name](path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_handled(name: str, data: bytes) -> None:
    TARGETS[name](data)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=tar_layers())
def test_generated_hostile_layers_are_handled(data: bytes) -> None:
    TARGETS["layer_merge"](data)
