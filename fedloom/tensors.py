"""Named tensors: an ordered name -> numpy array container.

This is the one currency for weights across fedloom: trainers produce it,
strategies consume it, the codec puts it on the wire. Conversion to and from a
torch ``state_dict`` shares memory (no copy) for CPU tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:  # torch is optional for the coordinator and strategies
    import torch

# Wire names of the supported dtypes. The wire name is what travels; numpy's
# own naming of these types is an implementation detail.
DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_NAME_OF = {dt: name for name, dt in DTYPES.items()}


class TensorError(ValueError):
    """A tensor or a set of tensors is not what it claims to be."""


def is_float(dtype: np.dtype) -> bool:
    """Floating point, bfloat16 included (numpy files ml_dtypes' bfloat16 under kind 'V')."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype, or a TensorError if unsupported."""
    try:
        return _NAME_OF[np.dtype(dtype)]
    except KeyError:
        raise TensorError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}") from None


def dtype_of(name: str) -> np.dtype:
    """The numpy dtype for a wire name, or a TensorError if unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise TensorError(f"unknown dtype {name!r}; supported: {', '.join(DTYPES)}") from None


class NamedTensors(Mapping[str, np.ndarray]):
    """An immutable, ordered mapping of parameter names to numpy arrays.

    The mapping is immutable; the arrays are not copied, so callers that
    mutate an array they handed in see the change (by design: zero copy).
    """

    __slots__ = ("_arrays",)

    def __init__(self, items: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]] = ()):
        pairs = items.items() if isinstance(items, Mapping) else items
        arrays: dict[str, np.ndarray] = {}
        for name, array in pairs:
            if not isinstance(name, str) or not name:
                raise TensorError(f"tensor names must be non-empty strings, got {name!r}")
            if name in arrays:
                raise TensorError(f"duplicate tensor name {name!r}")
            array = np.asarray(array)
            dtype_name(array.dtype)
            arrays[name] = array
        self._arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {a.dtype}{list(a.shape)}" for n, a in self._arrays.items())
        return f"NamedTensors({inner})"

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def spec(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Name -> (dtype name, shape): what a peer must agree on."""
        return {n: (dtype_name(a.dtype), a.shape) for n, a in self._arrays.items()}

    def select(self, names: Iterable[str]) -> NamedTensors:
        return NamedTensors((n, self._arrays[n]) for n in names)

    def map(self, fn) -> NamedTensors:
        return NamedTensors((n, fn(a)) for n, a in self._arrays.items())

    def equal(self, other: Mapping[str, np.ndarray]) -> bool:
        """Bitwise equality of names, order, dtypes, shapes and values."""
        if list(self) != list(other):
            return False
        return all(
            a.dtype == other[n].dtype
            and a.shape == other[n].shape
            and a.tobytes() == np.asarray(other[n]).tobytes()
            for n, a in self._arrays.items()
        )

    @classmethod
    def from_torch(cls, state: Mapping[str, torch.Tensor]) -> NamedTensors:
        """From a torch state_dict; CPU tensors share memory with the result."""
        return cls((name, _to_numpy(t)) for name, t in state.items())

    def to_torch(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """To a torch state_dict; on the CPU the tensors share memory with self."""
        return {n: _to_torch(a, device) for n, a in self._arrays.items()}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(a: np.ndarray, device: str | torch.device | None) -> torch.Tensor:
    import torch

    # torch cannot hold read-only memory (arrays over bytes, e.g. from a wire buffer): copy those.
    # np.ascontiguousarray is avoided because it turns a 0-d array into shape (1,).
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = a.copy(order="C")
    if a.dtype == DTYPES["bfloat16"]:
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t if device is None else t.to(device)
