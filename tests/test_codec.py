"""The tensor stream codec: round trips, chunking, zero copy, and refusal of malformed streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedloom.codec import MAX_DIMS, Decoder, End, Header, decode, encode
from fedloom.tensors import DTYPES, NamedTensors, TensorError


def _sample(wire: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = DTYPES[wire]
    if wire == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def _frames(t: NamedTensors, **kw) -> list:
    return list(encode(t, **kw))


@pytest.mark.parametrize("wire", list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (7, 5), (2, 3, 4)])
def test_round_trip_every_dtype_and_shape(wire, shape):
    t = NamedTensors({"t": _sample(wire, shape)})
    out = decode(encode(t, chunk_size=16))
    assert out.equal(t)
    assert out.spec() == {"t": (wire, shape)}


def test_round_trip_many_tensors_keeps_order():
    names = [f"layer{i:03d}.{'weight' if i % 2 else 'bias'}" for i in range(200)][::-1]
    wires = list(DTYPES)
    t = NamedTensors([(n, _sample(wires[i % len(wires)], (i % 5, 3), seed=i)) for i, n in enumerate(names)])
    out = decode(encode(t))
    assert list(out) == names
    assert out.equal(t)


def _data_sizes(frames) -> list[int]:
    return [len(f) for f in frames if isinstance(f, memoryview | bytes)]


@pytest.mark.parametrize(
    "nbytes, chunk_size, sizes",
    [
        (40, 16, [16, 16, 8]),  # chunk smaller than the tensor, with a remainder
        (48, 16, [16, 16, 16]),  # exact multiple: no empty trailing chunk
        (40, 40, [40]),  # exactly one chunk
        (40, 1000, [40]),  # chunk larger than the tensor
        (5, 1, [1, 1, 1, 1, 1]),  # one byte at a time
        (0, 8, []),  # empty tensor: a header and no data
    ],
)
def test_chunk_boundaries(nbytes, chunk_size, sizes):
    t = NamedTensors({"x": np.arange(nbytes, dtype=np.uint8)})
    frames = _frames(t, chunk_size=chunk_size)
    assert frames[0] == Header("x", "uint8", (nbytes,))
    assert frames[-1] == End(1)
    assert _data_sizes(frames) == sizes
    assert decode(frames, max_chunk=chunk_size).equal(t)


def test_encode_refuses_non_positive_chunk():
    with pytest.raises(ValueError):
        list(encode(NamedTensors({"x": np.zeros(1)}), chunk_size=0))


def test_data_frames_are_zero_copy_views():
    a = np.zeros((4, 4), dtype=np.float32)
    frames = _frames(NamedTensors({"a": a}), chunk_size=32)
    data = [f for f in frames if isinstance(f, memoryview)]
    assert len(data) == 2
    for view in data:
        assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), a)
    a[0, 0] = 1.0  # first 4 bytes of the first chunk
    assert bytes(data[0][:4]) == np.float32(1.0).tobytes()
    a[3, 3] = 2.0  # last 4 bytes of the last chunk
    assert bytes(data[1][-4:]) == np.float32(2.0).tobytes()


def test_decoder_writes_into_fresh_writable_arrays():
    src = NamedTensors({"a": np.arange(6, dtype=np.int32).reshape(2, 3)})
    out = decode([bytes(f) if isinstance(f, memoryview) else f for f in encode(src)])
    assert out["a"].flags.writeable and not np.shares_memory(out["a"], src["a"])
    assert out.equal(src)


def test_bytes_and_bytearray_chunks_accepted():
    frames = [Header("x", "int16", (2,)), bytearray(b"\x01\x00"), b"\x02\x00", End(1)]
    assert decode(frames)["x"].tolist() == [1, 2]


SPEC = {"w": ("float32", (2,)), "b": ("int64", ())}


def _ok_frames():
    return [Header("w", "float32", (2,)), bytes(8), Header("b", "int64", ()), bytes(8), End(2)]


MALFORMED = {
    "unknown dtype": ([Header("x", "complex64", (1,)), bytes(8), End(1)], {}, "unknown dtype"),
    "data before header": ([bytes(4), Header("x", "float32", (1,)), End(1)], {}, "before any tensor header"),
    "more data than shape": ([Header("x", "float32", (1,)), bytes(8), End(1)], {}, "more data"),
    "more data in a second chunk": ([Header("x", "float32", (1,)), bytes(4), b"\0", End(1)], {}, "more data"),
    "truncated then header": (
        [Header("x", "float32", (2,)), bytes(4), Header("y", "float32", (1,)), bytes(4), End(2)], {}, "truncated"),
    "truncated then end": ([Header("x", "float32", (2,)), bytes(4), End(1)], {}, "truncated"),
    "no end": ([Header("x", "float32", (1,)), bytes(4)], {}, "no end marker"),
    "empty stream": ([], {}, "no end marker"),
    "end count too high": ([Header("x", "uint8", (1,)), b"\0", End(2)], {}, "announced 2"),
    "end count too low": ([Header("x", "uint8", (1,)), b"\0", End(0)], {}, "announced 0"),
    "duplicate name": ([Header("x", "uint8", (1,)), b"\0", Header("x", "uint8", (1,)), b"\0", End(2)], {},
                       "duplicate"),
    "empty name": ([Header("", "uint8", (1,)), b"\0", End(1)], {}, "bad tensor name"),
    "overlong name": ([Header("n" * 5000, "uint8", (1,)), b"\0", End(1)], {}, "bad tensor name"),
    "frame after end": ([Header("x", "uint8", (1,)), b"\0", End(1), b"\0"], {}, "after the end"),
    "header after end": ([End(0), Header("x", "uint8", (0,))], {}, "after the end"),
    "negative dim": ([Header("x", "uint8", (2, -1)), End(1)], {}, "bad shape"),
    "non-integer dim": ([Header("x", "uint8", (1.5,)), End(1)], {}, "bad shape"),
    "too many dims": ([Header("x", "uint8", (1,) * (MAX_DIMS + 1)), b"\0", End(1)], {}, "bad shape"),
    "absurd dim with a zero": ([Header("x", "uint8", (2**70, 0)), End(1)], {}, None),
    "huge dims": ([Header("x", "uint8", (2**62, 2**62)), End(1)], {}, None),
    "oversized chunk": ([Header("x", "uint8", (10,)), bytes(10), End(1)], {"max_chunk": 8}, "exceeds the limit"),
    "total over max_bytes": (
        [Header("x", "uint8", (6,)), bytes(6), Header("y", "uint8", (6,)), bytes(6), End(2)], {"max_bytes": 10},
        "exceeds the limit"),
    "frame of another type": ([Header("x", "uint8", (1,)), 7, End(1)], {}, "unexpected frame type"),
    "unexpected name": (
        [Header("w", "float32", (2,)), bytes(8), Header("c", "int64", ()), bytes(8), End(2)], {"expected": SPEC},
        "unexpected tensor"),
    "wrong shape": ([Header("w", "float32", (3,)), bytes(12)], {"expected": SPEC}, "expected float32"),
    "wrong dtype": ([Header("w", "float64", (2,)), bytes(16)], {"expected": SPEC}, "expected float32"),
    "missing name": ([Header("w", "float32", (2,)), bytes(8), End(1)], {"expected": SPEC}, "missing"),
}


@pytest.mark.parametrize("frames, limits, match", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_streams_refused(frames, limits, match):
    with pytest.raises(TensorError, match=match):
        decode(frames, **limits)


def test_expected_spec_accepts_any_order_and_returns_spec_order():
    frames = [Header("b", "int64", ()), np.int64(9).tobytes(), Header("w", "float32", (2,)),
              np.array([1, 2], dtype=np.float32).tobytes(), End(2)]
    out = decode(frames, expected=SPEC)
    assert list(out) == ["w", "b"]
    assert out["b"] == 9 and out["w"].tolist() == [1.0, 2.0]
    assert decode(_ok_frames(), expected=SPEC).spec() == SPEC


def test_max_bytes_exactly_at_limit_is_allowed():
    frames = [Header("x", "uint8", (6,)), bytes(6), Header("y", "uint8", (4,)), bytes(4), End(2)]
    assert len(decode(frames, max_bytes=10)) == 2


def test_result_before_end_refused():
    d = Decoder()
    d.feed(Header("x", "uint8", (0,)))
    with pytest.raises(TensorError, match="no end marker"):
        d.result()


# ------------------------------------------------------------------ properties

_tensor_arrays = st.sampled_from(list(DTYPES)).flatmap(
    lambda wire: hnp.arrays(DTYPES[wire] if wire != "bfloat16" else np.dtype(np.uint16),
                            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    .map(lambda a, w=wire: a.view(DTYPES[w]) if w == "bfloat16" else a)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays=st.lists(_tensor_arrays, max_size=6),
    names=st.lists(st.text(min_size=1, max_size=12), min_size=6, max_size=6, unique=True),
    chunk_size=st.integers(1, 64),
)
def test_round_trip_property(arrays, names, chunk_size):
    t = NamedTensors(zip(names, arrays, strict=False))
    frames = list(encode(t, chunk_size=chunk_size))
    assert all(len(f) <= chunk_size for f in frames if isinstance(f, memoryview))
    out = decode(frames, expected=t.spec(), max_chunk=chunk_size)
    assert out.equal(t)


_frame = st.one_of(
    st.builds(
        Header,
        name=st.one_of(st.sampled_from(["a", "b", ""]), st.text(max_size=3)),
        dtype=st.one_of(st.sampled_from(list(DTYPES)), st.sampled_from(["complex64", "", "float8", "object"])),
        shape=st.lists(st.one_of(st.integers(-2, 4), st.sampled_from([0, 2**40, 2**64, 2**80])),
                       max_size=4).map(tuple),
    ),
    st.builds(End, count=st.integers(-1, 4)),
    st.binary(max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(frames=st.lists(_frame, max_size=10), expect=st.booleans())
def test_random_frames_only_ever_raise_tensor_error(frames, expect):
    limits = {"max_bytes": 1 << 16, "max_chunk": 16}
    if expect:
        limits["expected"] = {"a": ("float32", (2,)), "b": ("uint8", ())}
    try:
        out = decode(frames, **limits)
    except TensorError:
        return
    # whatever was accepted is consistent with the frames that carried it
    headers = [f for f in frames if isinstance(f, Header)]
    assert [h.name for h in headers] == list(out) or expect
    for h in headers:
        assert out[h.name].shape == h.shape and out.spec()[h.name][0] == h.dtype


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(_frame, max_size=10))
def test_random_frames_with_default_limits_only_raise_tensor_error(frames):
    # Default max_bytes is 1 TiB: absurd shapes must be refused, not attempted.
    try:
        decode(frames)
    except TensorError:
        pass


def test_typed_memoryview_chunks_count_bytes_not_items():
    src = np.array([[1.5, -2.0], [3.0, 4.25]], dtype=np.float32)
    frames = [Header("x", "float32", (2, 2)), memoryview(src), End(1)]  # a 2-d 'f' view of 16 bytes
    np.testing.assert_array_equal(decode(frames)["x"], src)
    with pytest.raises(TensorError, match="more data"):
        decode([Header("x", "float32", (1,)), memoryview(src[0]), End(1)])
    with pytest.raises(TensorError, match="not contiguous"):
        decode([Header("x", "float32", (2,)), memoryview(src[:, 0]), End(1)])


# ----------------------------------------------------------------- handing tensors over as they complete


def _streamed(frames, **limits) -> dict[str, np.ndarray]:
    """Decode with ``on_tensor``: each tensor's pieces, joined and reshaped."""
    got: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple] = {}

    def on_tensor(name, pieces):
        got[name] = np.concatenate([p.copy() for p in pieces]) if pieces else np.empty(0)

    decoder = Decoder(on_tensor=on_tensor, **limits)
    for frame in frames:
        if isinstance(frame, Header):
            shapes[frame.name] = frame.shape
        decoder.feed(frame)
    assert len(decoder.result()) == 0  # nothing is kept
    return {n: a.reshape(shapes[n]) for n, a in got.items()}


@pytest.mark.parametrize("frames, limits, match", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_streams_refused_when_streaming(frames, limits, match):
    with pytest.raises(TensorError, match=match):
        _streamed(frames, **limits)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=st.lists(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int16, np.uint8]),
                                  hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)),
                       min_size=1, max_size=4),
       chunk_size=st.integers(1, 40))
def test_streamed_tensors_arrive_whole_with_any_chunking(arrays, chunk_size):
    tensors = NamedTensors({f"t{i}": a for i, a in enumerate(arrays)})
    got = _streamed(encode(tensors, chunk_size=chunk_size))  # odd sizes split elements: gathered into a copy
    assert list(got) == list(tensors)
    for name, array in tensors.items():
        assert got[name].tobytes() == array.tobytes() and got[name].shape == array.shape


def test_streamed_pieces_are_views_of_the_chunks_when_they_hold_whole_elements():
    data = np.arange(8, dtype=np.float32)
    chunks = [data[:4].tobytes(), data[4:].tobytes()]
    seen = []
    decoder = Decoder(on_tensor=lambda name, pieces: seen.extend(pieces))
    for frame in [Header("x", "float32", (8,)), *chunks, End(1)]:
        decoder.feed(frame)
    assert len(seen) == 2 and all(not p.flags.writeable for p in seen)  # read-only views, no copy
    assert np.concatenate(seen).tolist() == data.tolist()


def test_a_split_element_is_gathered_into_the_given_buffer():
    taken = []

    def buffer(nbytes):
        taken.append(np.empty(nbytes + 3, np.uint8))
        return taken[-1]

    seen = []
    decoder = Decoder(on_tensor=lambda name, pieces: seen.extend(pieces), buffer=buffer)
    raw = np.arange(3, dtype=np.float32).tobytes()
    for frame in [Header("x", "float32", (3,)), raw[:5], raw[5:], End(1)]:
        decoder.feed(frame)
    assert len(taken) == 1 and len(seen) == 1 and seen[0].tolist() == [0.0, 1.0, 2.0]
    assert np.shares_memory(seen[0], taken[0])
