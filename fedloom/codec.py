"""The tensor stream codec: name, dtype, shape and raw bytes, in bounded chunks.

A stream is ``Header, data..., Header, data..., End``. Data chunks are at most
``chunk_size`` bytes (4 MiB by default), so a model of any size travels in
messages far below protobuf's 2 GiB cap. Encoding slices the arrays without
copying; decoding writes each chunk straight into its preallocated array, so
the receiver holds one copy of the tensors and nothing more. Nothing here is
pickled, and everything a peer sends is checked before it is trusted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedloom.tensors import NamedTensors, TensorError, dtype_name, dtype_of

CHUNK_SIZE = 4 * 1024 * 1024
MAX_DIMS = 32
MAX_NAME = 1024


@dataclass(frozen=True)
class Header:
    """Announces one tensor; its ``nbytes`` of data follow in chunks."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class End:
    """Closes a stream; ``count`` lets the receiver detect a lost tensor."""

    count: int


Frame = Header | End | bytes | memoryview


def encode(tensors: NamedTensors, *, chunk_size: int = CHUNK_SIZE) -> Iterator[Frame]:
    """Frames for ``tensors``; data frames are zero-copy views of the arrays."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    for name, array in tensors.items():
        yield Header(name, dtype_name(array.dtype), tuple(int(d) for d in array.shape))
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        view = memoryview(flat)
        for start in range(0, len(view), chunk_size):
            yield view[start : start + chunk_size]
    yield End(len(tensors))


class Decoder:
    """Rebuilds NamedTensors from frames, refusing anything inconsistent.

    ``expected`` (name -> (dtype, shape)), when given, must match exactly: no
    unknown, missing, reshaped or retyped tensor. ``max_bytes`` bounds the
    total payload a peer can make us allocate.

    With ``on_tensor``, each tensor is handed to ``on_tensor(name, pieces)`` as
    soon as its last byte arrives and is not kept (``result()`` is then empty):
    ``pieces`` are flat arrays of its dtype that together hold its elements in
    order, read-only views of the chunks as they came (no copy), or one array
    when a chunk split an element. ``buffer(nbytes)`` may supply the memory a
    tensor is copied into (a writable uint8 array of at least ``nbytes``).
    """

    def __init__(
        self,
        *,
        expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
        max_bytes: int = 1 << 40,
        max_chunk: int = CHUNK_SIZE,
        on_tensor: Callable[[str, list[np.ndarray]], None] | None = None,
        buffer: Callable[[int], np.ndarray] | None = None,
    ):
        self._expected = expected
        self._on_tensor = on_tensor
        self._buffer = buffer
        self._max_bytes = max_bytes
        self._max_chunk = max_chunk
        self._arrays: dict[str, np.ndarray | None] = {}  # None: handed to on_tensor
        self._open = False  # a tensor has begun and not all of its bytes are in
        self._name, self._dtype, self._shape, self._size, self._filled = "", np.dtype(np.uint8), (), 0, 0
        self._target: memoryview | None = None  # the bytes the current tensor is copied into
        self._pieces: list[np.ndarray] | None = None  # or its chunks, kept as they came (with on_tensor)
        self._total = 0
        self._done = False

    def feed(self, frame: Frame) -> None:
        if self._done:
            raise TensorError("frame after the end of the tensor stream")
        if isinstance(frame, Header):
            self._start(frame)
        elif isinstance(frame, End):
            self._end(frame)
        elif isinstance(frame, bytes | bytearray | memoryview):
            self._data(frame)
        else:
            raise TensorError(f"unexpected frame type {type(frame).__name__}")

    def _start(self, h: Header) -> None:
        self._require_complete(f"header of {h.name!r}")
        if not isinstance(h.name, str) or not h.name or len(h.name) > MAX_NAME:
            raise TensorError(f"bad tensor name {h.name!r:.80}")
        if h.name in self._arrays:
            raise TensorError(f"duplicate tensor {h.name!r}")
        dtype = dtype_of(h.dtype)
        if len(h.shape) > MAX_DIMS or any((not isinstance(d, int)) or not 0 <= d < 2**63 for d in h.shape):
            raise TensorError(f"bad shape {h.shape!r:.80} for {h.name!r}")
        if self._expected is not None:
            want = self._expected.get(h.name)
            if want is None:
                raise TensorError(f"unexpected tensor {h.name!r}")
            if (h.dtype, tuple(h.shape)) != (want[0], tuple(want[1])):
                raise TensorError(
                    f"tensor {h.name!r} is {h.dtype}{list(h.shape)}, expected {want[0]}{list(want[1])}"
                )
        nbytes = math.prod(h.shape) * dtype.itemsize
        self._total += nbytes
        if self._total > self._max_bytes:
            raise TensorError(f"tensor stream exceeds the limit of {self._max_bytes} bytes")
        self._name, self._dtype, self._shape, self._size, self._filled = h.name, dtype, tuple(h.shape), nbytes, 0
        self._open = True
        if self._on_tensor is not None:  # the chunks themselves are kept while they hold whole elements
            self._arrays[h.name] = None
            self._pieces, self._target = [], None
        else:
            self._arrays[h.name] = self._allocate()
        if nbytes == 0:
            self._complete()

    def _allocate(self) -> np.ndarray:
        """The array the current tensor is copied into; ``_target`` is its bytes."""
        try:  # a dim past numpy's limits (e.g. (2**70, 0)) or an allocation the OS refuses
            if self._buffer is None:
                array = np.empty(self._shape, dtype=self._dtype)
            else:
                array = self._buffer(self._size)[: self._size].view(self._dtype).reshape(self._shape)
        except (ValueError, MemoryError) as exc:
            raise TensorError(f"cannot allocate {self._name!r} of shape {self._shape!r:.80}: {exc}") from None
        self._target = memoryview(array.reshape(-1).view(np.uint8))
        return array

    def _data(self, chunk: bytes | bytearray | memoryview) -> None:
        if not self._open:
            if self._arrays:
                raise TensorError(f"more data than the shape of {next(reversed(self._arrays))!r} holds")
            raise TensorError("data before any tensor header")
        view = memoryview(chunk)
        if not view.c_contiguous:
            raise TensorError("data chunk is not contiguous")
        chunk = view.cast("B") if view.format != "B" or view.ndim != 1 else view  # len() must count bytes
        size = len(chunk)
        if size > self._max_chunk:
            raise TensorError(f"chunk of {size} bytes exceeds the limit of {self._max_chunk}")
        if self._filled + size > self._size:
            raise TensorError(f"more data than the shape of {self._name!r} holds")
        if self._pieces is not None and size % self._dtype.itemsize == 0:
            self._pieces.append(np.frombuffer(chunk, self._dtype))  # no copy: a view of the message
        else:
            if self._pieces is not None:  # a chunk splits an element: gather what came so far, copy from now on
                self._gather()
            assert self._target is not None
            self._target[self._filled : self._filled + size] = chunk
        self._filled += size
        if self._filled == self._size:
            self._complete()

    def _gather(self) -> None:
        pieces, self._pieces = self._pieces or [], None
        self._arrays[self._name] = self._allocate()
        assert self._target is not None
        position = 0
        for piece in pieces:
            raw = piece.view(np.uint8)
            self._target[position : position + raw.size] = raw
            position += raw.size

    def _complete(self) -> None:
        self._open, self._target = False, None
        if self._on_tensor is not None:
            array = self._arrays[self._name]
            pieces = self._pieces if array is None else [array.reshape(-1)]
            self._arrays[self._name], self._pieces = None, None
            self._on_tensor(self._name, pieces)

    def _end(self, end: End) -> None:
        self._require_complete("end of stream")
        if end.count != len(self._arrays):
            raise TensorError(f"stream announced {end.count} tensors, carried {len(self._arrays)}")
        if self._expected is not None:
            missing = [n for n in self._expected if n not in self._arrays]
            if missing:
                raise TensorError(f"missing tensors: {', '.join(missing[:5])}")
        self._done = True

    def _require_complete(self, where: str) -> None:
        if self._open:
            raise TensorError(f"truncated tensor {self._name!r}: {self._filled} of {self._size} bytes before {where}")

    def result(self) -> NamedTensors:
        if not self._done:
            raise TensorError("truncated tensor stream: no end marker")
        if self._on_tensor is not None:
            return NamedTensors()
        if self._expected is not None:
            return NamedTensors((n, self._arrays[n]) for n in self._expected)
        return NamedTensors(self._arrays)


def decode(frames: Iterable[Frame], **limits) -> NamedTensors:
    decoder = Decoder(**limits)
    for frame in frames:
        decoder.feed(frame)
    return decoder.result()
