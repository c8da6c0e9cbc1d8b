"""Cross-site evaluation with trainers whose numbers can be worked out by hand."""

from __future__ import annotations

import numpy as np

from fedloom import InProcessFleet, NamedTensors
from fedloom.server.crosssite import cross_site


class Site:
    """Training sets w to the site's own value; a model scores 1 - |w - value| on this site."""

    def __init__(self, value: float, broken: bool = False):
        self.value, self.broken = value, broken

    def fit(self, weights, config):
        if self.broken:
            raise RuntimeError("disk full")
        return NamedTensors({"w": np.array([self.value], np.float32)}), 1, {}

    def evaluate(self, weights, config):
        return 1, {"accuracy": 1.0 - abs(float(weights["w"][0]) - self.value)}


def test_table_holds_every_model_on_every_site() -> None:
    fleet = InProcessFleet({"a": Site(0.0), "b": Site(0.5), "c": Site(0.25, broken=True)})
    table = cross_site(fleet, NamedTensors({"w": np.array([1.0], np.float32)}), ["c", "a", "b"], config={},
                       round_=1)
    assert table.sites == ("a", "b", "c") and table.models == ("global", "a", "b")
    assert table.values["a"] == {"global": 0.0, "a": 1.0, "b": 0.5}
    assert table.values["b"] == {"global": 0.5, "a": 0.5, "b": 1.0}
    assert table.values["c"]["a"] == 0.75
    assert "fit:c" in table.failures and "disk full" in table.failures["fit:c"]
    assert table.rows()[0] == ["a", "0.0000", "1.0000", "0.5000"]
