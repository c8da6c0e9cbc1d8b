"""Property tests: random and mutated bytes never make a decoder raise anything but its own refusal."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.codec import End, Header, decode, encode
from fedloom.protos import serde
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.security import keys, signing
from fedloom.tensors import DTYPES, NamedTensors, TensorError
from fedloom.types import Instruction

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WEIGHTS = NamedTensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64)})
FRAMES = list(encode(WEIGHTS, chunk_size=8))
MESSAGES = [pb.TensorFrame, pb.SubmitMessage, pb.TaskHeader, pb.ResultHeader, pb.RegisterRequest, pb.NodeRef,
            pb.TaskRef, pb.PullTaskReply]


def _valid_wires() -> list[bytes]:
    instruction = Instruction("fit", 3, WEIGHTS, {"lr": 0.1, "epochs": 2, "opt": "sgd", "nesterov": True})
    header = serde.instruction_to_proto(instruction, "1:ab")
    out = [serde.frame_to_proto(f).SerializeToString() for f in FRAMES if not isinstance(f, memoryview)]
    out += [serde.data_frame_wire(b"abcdefgh"), serde.submit_data_wire(b"\x00" * 9), header.SerializeToString(),
            pb.SubmitMessage(header=pb.ResultHeader(fit=pb.ResultSummary(num_examples=4, metrics={"loss": 1.0})))
            .SerializeToString()]
    return out


VALID = _valid_wires()


@st.composite
def mutated(draw) -> bytes:
    """A valid wire message with bytes flipped, cut, inserted or deleted."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos]
    return bytes(data)


WIRE = st.one_of(st.binary(max_size=200), mutated())


def _parse(message_type, raw: bytes):
    try:
        return message_type.FromString(raw)
    except DecodeError:
        return None


@SETTINGS
@given(WIRE)
def test_raw_frame_views_agree_with_the_parser_or_decline(raw: bytes) -> None:
    for view_of, field in ((serde.data_frame_view, None), (serde.submit_data_view, "frame")):
        view = view_of(raw)
        if view is None:
            continue
        message = pb.TensorFrame.FromString(raw) if field is None else pb.SubmitMessage.FromString(raw).frame
        assert bytes(view) == message.data  # the zero-copy path reads exactly what protobuf would


@SETTINGS
@given(WIRE)
def test_proto_decoders_refuse_with_their_own_errors(raw: bytes) -> None:
    frame = _parse(pb.TensorFrame, raw)
    if frame is not None:
        try:
            serde.frame_from_proto(frame)
        except TensorError:
            pass
    header = _parse(pb.TaskHeader, raw)
    if header is not None:
        try:
            serde.instruction_from_proto(header, WEIGHTS)
        except ValueError:
            pass
    result = _parse(pb.ResultHeader, raw)
    if result is not None:
        for weights in (None, WEIGHTS):
            try:
                serde.result_from_proto(result, "n", weights)
            except ValueError:
                pass
    for message_type in MESSAGES:
        _parse(message_type, raw)


NAMES = st.one_of(st.sampled_from(["w", "b", "x", ""]), st.text(max_size=5))
SHAPES = st.lists(st.integers(-2, 2**40), max_size=4).map(tuple)
RANDOM_FRAME = st.one_of(
    st.builds(Header, NAMES, st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=8)), SHAPES),
    st.builds(End, st.integers(0, 5)),
    st.binary(max_size=40),
)


@SETTINGS
@given(st.lists(RANDOM_FRAME, max_size=12), st.booleans())
def test_tensor_decoder_refuses_random_streams_with_tensor_errors(frames, expect: bool) -> None:
    try:
        out = decode(frames, expected=WEIGHTS.spec() if expect else None, max_bytes=1 << 16, max_chunk=64)
    except TensorError:
        return
    if expect:
        assert out.spec() == WEIGHTS.spec()


@SETTINGS
@given(st.data())
def test_mutated_tensor_streams_decode_exactly_or_are_refused(data) -> None:
    frames = [bytes(f) if isinstance(f, memoryview) else f for f in FRAMES]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(frames) - 1))
        op = data.draw(st.sampled_from(["drop", "duplicate", "swap", "truncate", "extend", "reshape"]))
        if op == "drop":
            del frames[i]
        elif op == "duplicate":
            frames.insert(i, frames[i])
        elif op == "swap" and i + 1 < len(frames):
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
        elif op in ("truncate", "extend") and isinstance(frames[i], bytes):
            frames[i] = frames[i][:-1] if op == "truncate" else frames[i] + b"\x00"
        elif op == "reshape" and isinstance(frames[i], Header):
            frames[i] = Header(frames[i].name, frames[i].dtype, (*frames[i].shape, 1))
    if not frames:
        return
    try:
        out = decode(frames, expected=WEIGHTS.spec(), max_bytes=WEIGHTS.nbytes)
    except TensorError:
        return
    assert out.spec() == WEIGHTS.spec()  # accepted only when the structure is intact


METADATA = st.lists(st.tuples(st.sampled_from([*signing.KEYS, "other"]),
                              st.one_of(st.text(max_size=70), st.sampled_from(["0" * 32, "1e308", "nan", "-0"]))),
                    max_size=6)


@SETTINGS
@given(METADATA, st.binary(max_size=32))
def test_signature_checks_refuse_random_metadata_with_auth_errors(metadata, payload: bytes) -> None:
    verifier = signing.Verifier({"": ed25519.Ed25519PrivateKey.generate().public_key()})
    try:
        verifier.verify("/m", metadata, payload)
    except signing.AuthError as exc:
        assert exc.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    else:
        raise AssertionError("random metadata passed the signature check")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_authorized_keys_parser_refuses_random_text_with_key_file_errors(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("ak") / "authorized_keys"
    path.write_text(text, encoding="utf-8")
    try:
        keys.load_authorized_keys(path)
    except keys.KeyFileError:
        pass
