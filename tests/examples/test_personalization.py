
import pytest
import torch

from fedloom.server.evaluation import Watch
from fedloom.strategies.validation import best_model, early_stopping

DATA = {"clients": 6, "scheme": "shards", "alpha": 0.1, "classes_per_client": 2, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def example(load_example):
    torch.set_num_threads(1)
    return load_example("personalization")


@pytest.fixture(scope="module")
def fedavg_run(example):
    return example.run_method("fedavg", rounds=2, seed=0, **DATA)


def test_fedper_beats_fedavg_on_own_data_and_sends_less(example, fedavg_run):
    history, _ = example.run_method("fedper", rounds=2, seed=0, **DATA)
    assert all(not r.failures and r.num_results == 6 for r in history.rounds)
    fedper, fedavg = example.summary(history), example.summary(fedavg_run[0])
    assert fedper["final"] > fedavg["final"] + 0.15, (fedper, fedavg)
    # digits_cnn holds 13,706 float32 parameters, FedPer keeps the 650 of layer 9 home; 6 down + 6 up, 2 rounds
    assert fedavg["bytes"] == 2 * 12 * 4 * 13706 and fedper["bytes"] == 2 * 12 * 4 * (13706 - 650)


def test_cross_site_table_has_global_and_local_columns(example, fedavg_run):
    table = example.crosssite(*fedavg_run, sites=3, seed=0)
    assert table.sites == ("c00", "c01", "c02") and table.models == ("global", "c00", "c01", "c02")
    assert not table.failures
    # with two classes per client, a model fine-tuned on its own site does best there
    for site in table.sites:
        assert table.values[site][site] == max(table.values[site][m] for m in table.sites)


def test_early_stopping_fires_and_marks_the_best_round(example):
    watch = Watch(early_stopping(metric=example.METRIC, patience=1, min_delta=1.0), best_model(metric=example.METRIC))
    history, _ = example.run_method("fedavg", rounds=5, seed=0, watch=watch, **{**DATA, "clients": 3})
    # min_delta 1.0 means no accuracy can improve on round 1: the run stops right after round 2
    assert [r.round for r in history.rounds] == [1, 2] and history.rounds[0].best
    assert "early stop" in history.rounds[1].stopped and not history.rounds[0].stopped
