"""Each strategy family learns digits (quick variant of examples/convergence.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "convergence.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("convergence", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["fedavg", "fedadam", "scaffold", "fedmedian", "dp_fedavg", "fedbuff"])
def test_family_learns_digits(example, family) -> None:
    accuracy = example.main(["--quick", "--only", family])[family]
    assert accuracy > 0.3, f"{family} reached only {accuracy:.3f} (chance: 0.1)"
