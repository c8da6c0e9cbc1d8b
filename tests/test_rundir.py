"""The run directory: metrics lines, the safetensors model, atomic replacement."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from fedloom import rundir
from fedloom.rundir import METRICS, MODEL, RunDir, atomic_write, load_model
from fedloom.tensors import NamedTensors
from fedloom.types import RoundRecord


def _weights(scale: float = 1.0) -> NamedTensors:
    return NamedTensors([
        ("z.weight", (np.arange(6, dtype=np.float32).reshape(2, 3) * scale)),
        ("a.bias", np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)),
        ("m.count", np.array(7, dtype=np.int64)),
        ("b.mask", np.array([True, False])),
        ("c.half", np.array([0.5], dtype=np.float16)),
        ("d.u8", np.array([255, 0], dtype=np.uint8)),
    ])


def test_metrics_lines_and_model(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.record(RoundRecord(1, {"accuracy": 0.5}, 3, {"n2": "late"}, 1.23456), _weights())
    rd.record(RoundRecord(2, {"accuracy": 0.75}, 4, {}, 2.0), _weights(2.0))
    lines = (tmp_path / "run" / METRICS).read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"round": 1, "accuracy": 0.5, "num_results": 3, "num_failures": 1,
                                    "failures": {"n2": "late"}, "seconds": 1.2346}
    assert [r["round"] for r in rd.records()] == [1, 2]
    assert load_model(tmp_path / "run" / MODEL).equal(_weights(2.0))


def test_records_of_an_empty_dir(tmp_path):
    assert RunDir(tmp_path).records() == []


def test_model_round_trip_preserves_order_and_dtypes(tmp_path):
    w = _weights()
    rundir.save_model(tmp_path / "m.safetensors", w)
    back = load_model(tmp_path / "m.safetensors")
    assert list(back) == list(w)  # not safetensors' alphabetical order
    assert back.spec() == w.spec()
    assert back.equal(w)


def test_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"one"))
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"two"))
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / MODEL
    rundir.save_model(target, _weights())

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert load_model(target).equal(_weights())
    assert [p.name for p in tmp_path.iterdir()] == [MODEL]


def test_failure_in_save_model_keeps_the_old_model(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    rd.record(RoundRecord(1, {}, 1, {}, 0.0), _weights())

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)
        raise KeyboardInterrupt  # even a BaseException must clean up

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_model(tmp_path / MODEL, _weights(3.0))
    assert load_model(tmp_path / MODEL).equal(_weights())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MODEL, METRICS])
