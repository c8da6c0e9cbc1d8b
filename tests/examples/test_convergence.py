"""Each strategy family learns digits (quick variant of examples/convergence.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("convergence")


@pytest.mark.parametrize("family", ["fedavg", "fedadam", "scaffold", "fedmedian", "dp_fedavg", "fedbuff"])
def test_family_learns_digits(example, family) -> None:
    accuracy = example.main(["--quick", "--only", family])[family]
    assert accuracy > 0.3, f"{family} reached only {accuracy:.3f} (chance: 0.1)"
