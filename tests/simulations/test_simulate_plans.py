"""``fedloom simulate`` options beyond the basics: strategies, samplers, evaluation, transfer, tabular."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from fedloom.simulations.app import load_options, run_simulation
from fedloom.simulations.setup import build


def _run(tmp_path, **flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(fleet="inprocess", num_clients=6, rounds=2, fraction=1.0, partition="iid", epochs=1)
    options = load_options(None, run_dir=str(tmp_path), **{**base, **flags})
    with open(tmp_path / "out.txt", "w") as out:
        history = run_simulation(options, console=Console(file=out, width=200))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return history, lines, (tmp_path / "out.txt").read_text()


def test_strategy_by_name_with_params_and_sampler(tmp_path) -> None:
    _, lines, _ = _run(tmp_path, strategy="fedavgm", param=["server_momentum=0.5"], sampler="availability")
    assert len(lines) == 2 and all(line["num_results"] == 6 for line in lines)


def test_federated_evaluation_and_cross_site(tmp_path) -> None:
    _, lines, out = _run(tmp_path, eval_fraction=1.0, cross_site=3)
    assert all("federated_accuracy" in line and "federated_f1_macro" in line for line in lines)
    assert "cross-site accuracy" in out


def test_freeze_and_local_cut_the_bytes_and_save_personal_parameters(tmp_path) -> None:
    _, full, _ = _run(tmp_path / "a")
    _, part, _ = _run(tmp_path / "b", freeze="0.*", local="9.*", eval_fraction=1.0)
    assert part[0]["bytes_down"] < full[0]["bytes_down"]
    assert sorted(p.name for p in (tmp_path / "b" / "personal").iterdir())[0] == "client-0.safetensors"


def test_tabular_with_federated_normalization(tmp_path) -> None:
    history, _, _ = _run(tmp_path, dataset="breast_cancer", num_clients=4)
    assert history.rounds[-1].metrics["accuracy"] > 0.85


def test_early_stopping_fires_and_is_reported(tmp_path) -> None:
    options = dict(early_stopping="accuracy", patience=1, min_delta=1.0)  # no round can improve by 1.0
    history, lines, out = _run(tmp_path, **options)
    assert len(history.rounds) == 2 and "early stop" in lines[-1]["stopped"]
    assert "early stopping fired after round 2" in out


@pytest.mark.parametrize(("flags", "message"), [
    ({"strategy": "nope"}, "unknown strategy"),
    ({"strategy": "fedprox"}, "needs mu"),
    ({"freeze": "*"}, "no parameter to federate"),
    ({"sampler": "random"}, "sampler must be one of"),
])
def test_bad_options_are_refused_before_anything_runs(flags, message) -> None:
    with pytest.raises(ValueError, match=message):
        build(load_options(None, fleet="inprocess", num_clients=4, **flags))


def test_params_from_a_toml_table(tmp_path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text('strategy = "fedprox"\nrounds = 3\n[params]\nmu = 0.5\n')
    options = load_options(path, param=["mu=0.25"])
    assert options.params == {"mu": "0.25"} and options.rounds == 3
    assert build(load_options(path, num_clients=4)).strategy.fit_config == {"mu": 0.5}
