"""Simulation options, workloads and the in-process path of ``fedloom simulate`` (no Ray here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedloom.cli import app
from fedloom.client.torch_trainer import TensorData
from fedloom.rundir import load_model
from fedloom.simulations import simulate, workloads
from fedloom.simulations.app import SimulationOptions, load_options


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_flags():
    opts = load_options(None)
    assert opts == SimulationOptions()
    assert (opts.dataset, opts.num_clients, opts.partition, opts.alpha, opts.fraction, opts.fleet) == (
        "digits", 100, "dirichlet", 0.5, 0.1, "ray")
    assert opts.fit_config() == {}


def test_file_then_flags_override(tmp_path):
    cfg = write(tmp_path / "sim.toml", 'num_clients = 12\nrounds = 3\npartition = "shards"\nlr = 0.1\n')
    opts = load_options(cfg, rounds=5, lr=None, seed=4)
    assert (opts.num_clients, opts.rounds, opts.partition, opts.lr, opts.seed) == (12, 5, "shards", 0.1, 4)
    assert opts.fit_config() == {"lr": 0.1}


@pytest.mark.parametrize(("text", "message"), [
    ("num_client = 3\n", "unknown keys num_client"),
    ('partition = "zipf"\n', "partition must be one of"),
    ("fraction = 1.5\n", "fraction"),
    ("rounds = [\n", "cannot read config"),
    ('dataset = "npz"\n', "needs data"),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_options(write(tmp_path / "bad.toml", text))


def test_synthetic_workload_holds_out_part_of_every_client():
    work = workloads.synthetic(5, alpha=0.5, beta=0.5, seed=1)
    assert work.num_clients == 5
    assert sum(len(p) for p in work.parts) == len(work.train)
    assert np.array_equal(np.concatenate(work.parts), np.arange(len(work.train)))
    x = torch.from_numpy(work.train.x[:4])
    assert work.model_fn()(x).shape == (4, 10)
    assert 0.15 < len(work.test) / (len(work.test) + len(work.train)) < 0.25


def test_npz_workload_flattens_features(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.normal(size=(200, 2, 3)).astype(np.float32), y=rng.integers(0, 3, 200))
    work = workloads.npz(path, 4, scheme="iid")
    assert work.train.x.shape[1] == 6 and len(work.train) + len(work.test) == 200
    n, metrics = work.trainer(0).fit(work.initial_weights(0), {"epochs": 1})[1:]
    assert n == len(work.parts[0]) and np.isfinite(metrics["loss"])


def test_torch_dataset_to_per_client_tensor_data():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    y = torch.tensor([0, 1] * 10)
    ds = torch.utils.data.TensorDataset(x, y)
    whole = workloads.tensor_data(ds)
    assert torch.equal(whole.x, x) and torch.equal(whole.y, y)
    parts = workloads.split_dataset(ds, 2, scheme="shards", classes_per_client=1, seed=0)
    assert [len(p) for p in parts] == [10, 10]  # one shard of each class
    assert sorted(int(p.y[0]) for p in parts) == [0, 1]
    assert all(isinstance(p, TensorData) and len(torch.unique(p.y)) == 1 for p in parts)
    iid = workloads.split_dataset(whole, 3, scheme="iid", seed=0)
    assert sorted(len(p) for p in iid) == [6, 7, 7]
    seen = torch.sort(torch.cat([p.x[:, 0] for p in iid])).values
    assert torch.equal(seen, x[:, 0])  # every sample once


def test_simulate_inprocess_records_the_run(tmp_path):
    work = workloads.make("digits", 6, scheme="iid")
    seen = []
    history = simulate(work.trainer, num_clients=6, rounds=2, initial_weights=work.initial_weights(0),
                       fraction=0.5, seed=1, fit_config={"epochs": 1}, fleet="inprocess", evaluate=work.evaluator(),
                       run_dir=tmp_path, on_round=lambda rec, w: seen.append(rec.round))
    assert seen == [1, 2]
    assert [r.num_results for r in history.rounds] == [3, 3]
    assert load_model(tmp_path / "model.safetensors").equal(history.weights)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2] and "accuracy" in lines[-1]


def test_cli_inprocess_with_config_file_and_override(tmp_path):
    cfg = write(tmp_path / "sim.toml", 'num_clients = 10\nrounds = 5\nfleet = "inprocess"\nepochs = 1\n'
                f'run_dir = "{tmp_path / "ignored"}"\n')
    result = CliRunner().invoke(app, ["simulate", "--config", str(cfg), "--rounds", "2", "--partition", "iid",
                                      "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "samples" in result.output and "classes" in result.output  # the partition statistics
    assert "run directory" in result.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the flag's 2 rounds, not the file's 5
    assert not (tmp_path / "ignored").exists()


def test_cli_rejects_unknown_config_keys(tmp_path):
    cfg = write(tmp_path / "sim.toml", "colour = 1\n")
    result = CliRunner().invoke(app, ["simulate", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "unknown keys colour" in result.output
