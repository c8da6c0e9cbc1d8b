"""Round trips between proto messages and domain types, and refusal of malformed messages."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.codec import End, Header, decode, encode
from fedloom.protos import serde
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.tensors import NamedTensors, TensorError
from fedloom.types import EvalRes, Failure, FitRes, Instruction

WEIGHTS = NamedTensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64),
                        "s": np.array(3.5, np.float64)})


@pytest.mark.parametrize("frame", [Header("w", "float32", (2, 3)), Header("scalar", "bool", ()), End(0), End(7),
                                   b"", b"\x00\x01\xff"])
def test_frame_round_trip(frame) -> None:
    wire = serde.frame_to_proto(frame).SerializeToString()
    assert serde.frame_from_proto(pb.TensorFrame.FromString(wire)) == frame


def test_memoryview_frames_become_bytes() -> None:
    view = memoryview(np.array([1.0, 2.0], np.float32)).cast("B")
    assert serde.frame_to_proto(view).data == np.array([1.0, 2.0], np.float32).tobytes()


def test_tensors_round_trip_through_proto_frames() -> None:
    frames = [pb.TensorFrame.FromString(serde.frame_to_proto(f).SerializeToString()) for f in encode(WEIGHTS)]
    back = decode(serde.frame_from_proto(f) for f in frames)
    assert back.equal(WEIGHTS)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 4 << 20])
def test_raw_data_frames_are_protobuf_with_the_chunk_8_byte_aligned(size) -> None:
    chunk = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame, submit = serde.data_frame_wire(chunk), serde.submit_data_wire(chunk)
    assert pb.TensorFrame.FromString(frame).data == chunk  # padded lengths parse as the plain encoding does
    assert pb.SubmitMessage.FromString(submit).frame.data == chunk
    for wire, view, offset in ((frame, serde.data_frame_view(frame), 8), (submit, serde.submit_data_view(submit), 16)):
        assert view is not None and view == chunk
        assert len(wire) - len(view) == offset  # a bytes object's data is 16-byte aligned: so are the elements
    if size >= 8:
        assert np.frombuffer(serde.submit_data_view(submit)[: size - size % 8], np.float64).flags.aligned


@pytest.mark.parametrize(("message", "error"), [
    (pb.TensorFrame(), "empty tensor frame"),
    (pb.TensorFrame(header=pb.TensorHeader(name="x", dtype="float32", shape=[1] * 33)), "at most 32"),
])
def test_malformed_frames_are_refused(message, error) -> None:
    with pytest.raises(TensorError, match=error):
        serde.frame_from_proto(message)


def test_non_frame_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        serde.frame_to_proto(3)  # type: ignore[arg-type]


CONFIG = {"lr": 0.05, "epochs": 5, "seed": -(2**62), "nesterov": True, "opt": "sgd", "zero": 0, "off": False}


def test_config_round_trip_keeps_types() -> None:
    header = serde.instruction_to_proto(Instruction("fit", 3, WEIGHTS, CONFIG), "1:abc")
    back = serde.instruction_from_proto(pb.TaskHeader.FromString(header.SerializeToString()), WEIGHTS)
    assert back.config == CONFIG
    assert {k: type(v) for k, v in back.config.items()} == {k: type(v) for k, v in CONFIG.items()}
    assert (back.kind, back.round, back.weights) == ("fit", 3, WEIGHTS)


@pytest.mark.parametrize(("config", "error"), [({"x": [1]}, "bool, int, float or str"), ({"": 1}, "key"),
                                               ({"x": None}, "bool, int, float or str")])
def test_bad_config_is_refused(config, error) -> None:
    with pytest.raises(ValueError, match=error):
        serde.instruction_to_proto(Instruction("fit", 1, WEIGHTS, config), "t")


@pytest.mark.parametrize(("header", "error"), [
    (pb.TaskHeader(task_id="t", kind="train", round=1), "unknown task kind"),
    (pb.TaskHeader(task_id="t", kind="fit", round=-1), "non-negative"),
])
def test_bad_task_header_is_refused(header, error) -> None:
    with pytest.raises(ValueError, match=error):
        serde.instruction_from_proto(header, WEIGHTS)


def test_empty_config_value_is_refused() -> None:
    header = pb.TaskHeader(task_id="t", kind="fit", round=1)
    header.config["x"].SetInParent()
    with pytest.raises(ValueError, match="empty"):
        serde.instruction_from_proto(header, WEIGHTS)


REF = pb.TaskRef(node=pb.NodeRef(node_id="n", session="s"), task_id="1:ab")


@pytest.mark.parametrize("outcome", [
    FitRes("n", WEIGHTS, 12, {"loss": 0.25, "accuracy": 0.5}),
    EvalRes("n", 7, {"accuracy": 1.0}),
    EvalRes("n", 0, {}),
])
def test_result_header_round_trip(outcome) -> None:
    header = pb.ResultHeader.FromString(serde.result_header_to_proto(outcome, REF).SerializeToString())
    assert header.task == REF
    weights = WEIGHTS if isinstance(outcome, FitRes) else None
    assert serde.result_from_proto(header, "n", weights) == outcome


def test_failure_round_trip_keeps_the_reason() -> None:
    header = serde.result_header_to_proto(Failure("n", "CUDA out of memory"), REF)
    assert serde.result_kind(header) == "failure"
    assert serde.result_from_proto(header, "n") == Failure("n", "node reported: CUDA out of memory")


@pytest.mark.parametrize(("header", "weights", "error"), [
    (pb.ResultHeader(task=REF), None, "none of fit, evaluate or failure"),
    (pb.ResultHeader(task=REF, fit=pb.ResultSummary(num_examples=-1)), WEIGHTS, "non-negative"),
    (pb.ResultHeader(task=REF, fit=pb.ResultSummary(num_examples=3)), None, "needs its weights"),
    (pb.ResultHeader(task=REF, evaluate=pb.ResultSummary(num_examples=1, metrics={"": 1.0})), None, "key"),
])
def test_bad_result_header_is_refused(header, weights, error) -> None:
    with pytest.raises(ValueError, match=error):
        serde.result_from_proto(header, "n", weights)
