import math

import pytest


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("fedprox_synthetic")


@pytest.mark.parametrize("round_", [1, 2, 7])
def test_nine_of_ten_selected_clients_straggle_with_seeded_epochs(example, round_):
    fleet = example.Stragglers(None, fraction=0.9, epochs=20, drop=False, seed=3)
    ids = [f"c{k:02d}" for k in range(10)]
    slow = fleet.stragglers(round_, ids)
    assert len(slow) == 9 and slow == fleet.stragglers(round_, list(reversed(ids)))
    epochs = [fleet.straggler_epochs(round_, node) for node in ids]
    assert all(1 <= e <= 20 for e in epochs) and epochs == [fleet.straggler_epochs(round_, n) for n in ids]


@pytest.mark.parametrize("method, results", [("fedavg_drop", 1), ("fedprox_mu1", 10)])
def test_two_rounds(example, method, results):
    records = example.run(method, rounds=2, seed=0, epochs=3)
    assert [r["results"] for r in records] == [results, results]
    # the zero-initialised model starts at loss log(10); keeping partial work must improve on it
    if method == "fedprox_mu1":
        assert records[-1]["global_train_loss"] < math.log(10) - 0.1
        assert records[-1]["test_accuracy"] > 0.2
