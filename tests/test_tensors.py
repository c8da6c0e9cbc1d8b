"""NamedTensors: construction checks, order, equality and zero-copy torch conversion."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from fedloom.tensors import DTYPES, NamedTensors, TensorError, dtype_name, dtype_of


@pytest.mark.parametrize(
    "items, match",
    [
        ([("a", np.zeros(2)), ("a", np.ones(2))], "duplicate"),
        ([("", np.zeros(2))], "non-empty"),
        ([(3, np.zeros(2))], "non-empty"),
        ([("c", np.zeros(2, dtype=np.complex64))], "unsupported dtype"),
        ([("o", np.array([object()], dtype=object))], "unsupported dtype"),
        ([("u", np.zeros(2, dtype=np.uint16))], "unsupported dtype"),
        ([("be", np.zeros(2, dtype=">f4"))], "unsupported dtype"),
        ([("s", np.array(["x"]))], "unsupported dtype"),
    ],
)
def test_construction_refuses(items, match):
    with pytest.raises(TensorError, match=match):
        NamedTensors(items)


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_wire_dtype_accepted_and_named(name):
    t = NamedTensors({"x": np.zeros((2, 3), dtype=DTYPES[name])})
    assert t.spec() == {"x": (name, (2, 3))}
    assert dtype_name(dtype_of(name)) == name


def test_unknown_wire_dtype_refused():
    with pytest.raises(TensorError, match="unknown dtype"):
        dtype_of("complex64")


def test_order_preserved_and_mapping_behaviour():
    names = ["z", "a", "m", "b"]
    t = NamedTensors([(n, np.full(i + 1, i, dtype=np.int32)) for i, n in enumerate(names)])
    assert list(t) == names
    assert len(t) == 4
    assert t.nbytes == 4 * (1 + 2 + 3 + 4)
    assert list(t.select(["m", "z"])) == ["m", "z"]
    doubled = t.map(lambda a: a * 2)
    assert list(doubled) == names and doubled["b"].tolist() == [6, 6, 6, 6]
    with pytest.raises(TypeError):
        t["new"] = np.zeros(1)  # type: ignore[index]


def test_arrays_are_not_copied():
    a = np.zeros(3, dtype=np.float32)
    t = NamedTensors({"a": a})
    a[1] = 7
    assert t["a"][1] == 7


def test_equal_is_bitwise_over_names_order_dtype_shape_values():
    base = NamedTensors({"a": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([1], dtype=np.int64)})
    same = NamedTensors({"a": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([1], dtype=np.int64)})
    assert base.equal(same)
    assert not base.equal(NamedTensors({"b": same["b"], "a": same["a"]}))  # order
    assert not base.equal(NamedTensors({"a": same["a"].astype(np.float64), "b": same["b"]}))  # dtype
    assert not base.equal(NamedTensors({"a": same["a"].reshape(2, 1), "b": same["b"]}))  # shape
    assert not base.equal(NamedTensors({"a": np.array([1.0, 2.5], dtype=np.float32), "b": same["b"]}))  # value
    assert not base.equal(NamedTensors({"a": same["a"]}))  # missing name
    # bitwise: -0.0 differs from 0.0, NaN equals the same NaN
    assert not NamedTensors({"z": np.array([0.0])}).equal(NamedTensors({"z": np.array([-0.0])}))
    assert NamedTensors({"n": np.array([np.nan])}).equal(NamedTensors({"n": np.array([np.nan])}))


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_from_torch_shares_memory_both_ways(torch_dtype):
    state = {"w": torch.zeros(2, 3, dtype=torch_dtype), "b": torch.zeros(3, dtype=torch_dtype)}
    t = NamedTensors.from_torch(state)
    assert list(t) == ["w", "b"]
    assert t["w"].shape == (2, 3)
    # torch -> numpy
    state["w"][1, 2] = 1
    assert t["w"][1, 2] == 1
    # numpy -> torch
    t["b"][0] = 1
    assert bool(state["b"][0] == 1)


@pytest.mark.parametrize("torch_dtype, wire", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16"),
                                               (torch.float16, "float16"), (torch.int8, "int8")])
def test_to_torch_shares_memory_and_keeps_dtype(torch_dtype, wire):
    t = NamedTensors({"x": np.zeros((4,), dtype=DTYPES[wire]), "y": np.ones((2, 2), dtype=DTYPES[wire])})
    out = t.to_torch()
    assert list(out) == ["x", "y"]
    assert out["x"].dtype == torch_dtype and tuple(out["y"].shape) == (2, 2)
    out["x"][2] = 3
    assert t["x"][2] == 3
    t["y"][0, 1] = 5
    assert float(out["y"][0, 1]) == 5


def test_bfloat16_values_survive_the_round_trip():
    src = torch.tensor([1.5, -2.25, 3.0e38, 1e-3], dtype=torch.bfloat16)
    t = NamedTensors.from_torch({"x": src})
    assert t["x"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(t["x"].astype(np.float32), src.float().numpy())
    back = t.to_torch()["x"]
    assert torch.equal(back, src)


@pytest.mark.parametrize("wire", list(DTYPES))
def test_scalar_keeps_its_shape_through_torch(wire):
    t = NamedTensors({"s": np.ones((), dtype=DTYPES[wire])})
    out = t.to_torch()
    assert tuple(out["s"].shape) == ()
    assert NamedTensors.from_torch(out).equal(t)


def test_read_only_arrays_convert_without_aliasing_the_buffer():
    for wire in ("float32", "bfloat16"):
        buf = bytes(8)
        a = np.frombuffer(buf, dtype=DTYPES[wire])
        assert not a.flags.writeable
        out = NamedTensors({"a": a}).to_torch()["a"]
        out += 1  # must not write into the immutable bytes object
        assert buf == bytes(8)


def test_from_torch_detaches_grad_tensors():
    p = torch.nn.Parameter(torch.ones(2))
    t = NamedTensors.from_torch({"p": p})
    t["p"][0] = 4
    assert float(p.data[0]) == 4


def test_from_torch_refuses_complex():
    with pytest.raises(TensorError):
        NamedTensors.from_torch({"c": torch.zeros(2, dtype=torch.complex64)})
