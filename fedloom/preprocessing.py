"""Federated preprocessing: global feature statistics from clients' sufficient statistics.

Each client reduces its rows to ``FeatureStats`` -- per feature the count,
mean, M2 (sum of squared deviations from the mean), min and max, plus class
counts -- and sends only those. The coordinator merges them with Chan et
al.'s parallel update (numerically stable: no sums of squares of raw values),
so the global mean and standard deviation equal those of the pooled rows,
which never leave the clients.

The request is an ``evaluate`` instruction whose config has
``{"task": "feature_stats"}``; the answer's metrics carry the stats under
``fstats/``. The coordinator then sends the normalization it chose in every
fit/evaluate config (``norm/...`` keys, ``FeatureStats.to_config``) and the
client applies it with ``Normalizer.from_config``.

Privacy: min and max are values of single rows; send ``method="standard"``
statistics only (or add noise) where that matters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedloom.fleet import Fleet
from fedloom.tensors import NamedTensors
from fedloom.types import Config, EvalRes, Failure, Instruction, Metrics

if TYPE_CHECKING:
    import torch

TASK = "feature_stats"
PREFIX = "fstats/"
NORM = "norm/"
METHODS = ("standard", "minmax")
MAX_FEATURES = 100_000  # decoded from untrusted clients; the gRPC maps hold at most 1024 entries anyway
MAX_CLASSES = 100_000
_ARRAYS = ("mean", "m2", "min", "max")


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of rows of ``num_features`` features (all arrays float64, ``(D,)``).

    ``class_counts`` has one count per class, or is empty when labels were not counted.
    With ``count == 0`` the arrays are zeros (min/max are undefined).
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    class_counts: np.ndarray

    @property
    def num_features(self) -> int:
        return len(self.mean)

    def variance(self, *, ddof: int = 0) -> np.ndarray:
        if self.count - ddof <= 0:
            raise ValueError(f"variance with ddof={ddof} needs more than {ddof} rows, have {self.count}")
        return self.m2 / (self.count - ddof)

    def std(self, *, ddof: int = 0) -> np.ndarray:
        """Population (``ddof=0``, as scikit-learn's StandardScaler) or sample standard deviation."""
        return np.sqrt(self.variance(ddof=ddof))

    def to_metrics(self, *, prefix: str = PREFIX) -> dict[str, float]:
        """A flat metrics dict: ``count``, ``features``, ``classes``, ``mean/j``, ``m2/j``, ``min/j``,
        ``max/j`` (only when count > 0) and ``class/c``."""
        out = {f"{prefix}count": float(self.count), f"{prefix}features": float(self.num_features),
               f"{prefix}classes": float(len(self.class_counts))}
        if self.count:
            for tag in _ARRAYS:
                out.update({f"{prefix}{tag}/{j}": float(v) for j, v in enumerate(getattr(self, tag))})
        out.update({f"{prefix}class/{c}": float(v) for c, v in enumerate(self.class_counts)})
        return out

    @classmethod
    def from_metrics(cls, metrics: Metrics, *, prefix: str = PREFIX) -> FeatureStats:
        """Stats from ``to_metrics``' encoding; checks everything, since it comes from clients."""
        return _decode(metrics, prefix)

    def to_config(self, method: str = "standard") -> dict[str, Any]:
        """The normalization as config keys for fit/evaluate instructions (see ``Normalizer``)."""
        if self.count == 0:
            raise ValueError("no rows: statistics are undefined")
        if method == "standard":
            shift, scale = self.mean, self.std()
        elif method == "minmax":
            shift, scale = self.min, self.max - self.min
        else:
            raise ValueError(f"unknown normalization {method!r}; choose one of {', '.join(METHODS)}")
        return Normalizer(method, shift, _safe_scale(scale)).to_config()


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    """Constant features get scale 1 (they are only shifted), as in scikit-learn."""
    return np.where(scale > 0, scale, 1.0)


def empty(num_features: int, num_classes: int = 0) -> FeatureStats:
    """Stats of no rows: the identity of ``merge``."""
    z = np.zeros(num_features, np.float64)
    return FeatureStats(0, z, z.copy(), z.copy(), z.copy(), np.zeros(num_classes, np.int64))


def _flat(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = x.detach().cpu().numpy()
    return np.asarray(x, np.float64).reshape(len(x), int(np.prod(x.shape[1:])))


def feature_stats(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None, *,
                  num_classes: int = 0) -> FeatureStats:
    """One client's stats of rows ``x`` (N x ...; flattened per row) and, with ``num_classes``, labels ``y``."""
    rows = _flat(x)
    if not np.isfinite(rows).all():
        raise ValueError("features contain NaN or Inf")
    counts = np.zeros(num_classes, np.int64)
    if num_classes:
        if y is None:
            raise ValueError("num_classes given but no labels")
        labels = np.asarray(y if isinstance(y, np.ndarray) else y.detach().cpu().numpy())
        if labels.shape != (len(rows),) or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
            raise ValueError(f"labels must be {len(rows)} integers in [0, {num_classes})")
        counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
    if len(rows) == 0:
        return _empty_with(rows.shape[1], counts)
    mean = rows.mean(axis=0)
    m2 = ((rows - mean) ** 2).sum(axis=0)  # two passes: exact to rounding, unlike sum(x^2) - n mean^2
    return FeatureStats(len(rows), mean, m2, rows.min(axis=0), rows.max(axis=0), counts)


def _empty_with(num_features: int, counts: np.ndarray) -> FeatureStats:
    e = empty(num_features)
    return FeatureStats(0, e.mean, e.m2, e.min, e.max, counts)


def merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """The stats of the union of two disjoint sets of rows (Chan, Golub and LeVeque's pairwise update)."""
    if a.num_features != b.num_features or len(a.class_counts) != len(b.class_counts):
        raise ValueError(f"cannot merge stats of {a.num_features} features / {len(a.class_counts)} classes with "
                         f"{b.num_features} features / {len(b.class_counts)} classes")
    classes = a.class_counts + b.class_counts
    if a.count == 0 or b.count == 0:
        base = b if a.count == 0 else a
        return FeatureStats(base.count, base.mean, base.m2, base.min, base.max, classes)
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta**2 * (a.count * b.count / n)
    return FeatureStats(n, mean, m2, np.minimum(a.min, b.min), np.maximum(a.max, b.max), classes)


def merge_all(stats: Iterable[FeatureStats]) -> FeatureStats:
    items = list(stats)
    if not items:
        raise ValueError("merge_all needs at least one FeatureStats")
    out = items[0]
    for s in items[1:]:
        out = merge(out, s)
    return out


# ------------------------------------------------------------- decoding


def _int(key: str, value: Any, *, low: int = 0, high: int | None = None) -> int:
    v = float(value)
    if not (math.isfinite(v) and v == int(v) and v >= low and (high is None or v <= high)):
        raise ValueError(f"{key}: expected an integer in [{low}, {high if high is not None else 'inf'}], "
                         f"got {value!r}")
    return int(v)


def _decode(metrics: Metrics, prefix: str) -> FeatureStats:
    try:
        count = _int("count", metrics[f"{prefix}count"])
        d = _int("features", metrics[f"{prefix}features"], low=1, high=MAX_FEATURES)
        c = _int("classes", metrics[f"{prefix}classes"], high=MAX_CLASSES)
    except KeyError as exc:
        raise ValueError(f"metrics carry no complete feature stats: {exc} missing") from None
    arrays = {tag: np.full(d, np.nan) for tag in _ARRAYS}
    classes = np.full(c, -1, np.int64)
    for key, value in metrics.items():
        if not key.startswith(prefix) or key[len(prefix):] in ("count", "features", "classes"):
            continue
        tag, _, index = key[len(prefix):].partition("/")
        size = c if tag == "class" else d if tag in arrays and count else None
        if size is None or not index.isdigit() or int(index) >= size:
            raise ValueError(f"unexpected feature stats key {key!r} ({count} rows, {d} features, {c} classes)")
        if tag == "class":
            classes[int(index)] = _int(key, value)
        else:
            arrays[tag][int(index)] = float(value)
    if (classes < 0).any():
        raise ValueError(f"feature stats lack class counts {np.flatnonzero(classes < 0)[:3].tolist()}")
    if c and classes.sum() != count:
        raise ValueError(f"class counts sum to {int(classes.sum())}, not to the {count} rows")
    if count == 0:
        return _empty_with(d, classes)
    _check_arrays(arrays, count)
    return FeatureStats(count, arrays["mean"], arrays["m2"], arrays["min"], arrays["max"], classes)


def _check_arrays(arrays: Mapping[str, np.ndarray], count: int) -> None:
    for tag, values in arrays.items():
        if np.isnan(values).any():
            raise ValueError(f"feature stats lack {tag} of features {np.flatnonzero(np.isnan(values))[:3].tolist()}")
        if not np.isfinite(values).all():
            raise ValueError(f"feature stats {tag} is not finite")
    lo, hi, mean = arrays["min"], arrays["max"], arrays["mean"]
    if (arrays["m2"] < 0).any():
        raise ValueError("feature stats m2 (sum of squared deviations) must be non-negative")
    slack = 1e-9 * np.maximum(np.abs(lo), np.abs(hi)) + 1e-12
    if (lo > hi).any() or (mean < lo - slack).any() or (mean > hi + slack).any():
        raise ValueError("inconsistent feature stats: need min <= mean <= max")
    # no set of values in [lo, hi] has a larger sum of squared deviations than count * range^2 / 4
    if (arrays["m2"] > count * (hi - lo) ** 2 / 4 * (1 + 1e-9) + 1e-12).any():
        raise ValueError("inconsistent feature stats: m2 exceeds what the min/max range allows")


# ------------------------------------------------------------- the task


def is_stats_task(config: Config) -> bool:
    return config.get("task") == TASK


def answer(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None, *,
           num_classes: int = 0) -> tuple[int, dict[str, float]]:
    """A client's answer to the feature_stats task, as ``Trainer.evaluate`` returns it."""
    stats = feature_stats(x, y, num_classes=num_classes)
    return stats.count, stats.to_metrics()


def collect_feature_stats(fleet: Fleet, node_ids: Iterable[str], *, timeout: float,
                          failures: dict[str, str] | None = None, config: Config | None = None) -> FeatureStats:
    """Ask ``node_ids`` for their feature stats and merge them; no rows leave the nodes.

    Nodes that fail or send malformed stats are recorded in ``failures`` and
    left out; it raises ValueError when no node answered. Stats are merged in
    node-id order, so the result does not depend on arrival order.
    """
    failures = failures if failures is not None else {}
    ids = sorted(node_ids)
    instruction = Instruction("evaluate", 0, NamedTensors(), {**(config or {}), "task": TASK})
    answers: dict[str, FeatureStats] = {}
    for outcome in fleet.run(instruction, ids, timeout=timeout):
        if isinstance(outcome, Failure):
            failures[outcome.node_id] = outcome.reason
        elif isinstance(outcome, EvalRes):
            try:
                answers[outcome.node_id] = FeatureStats.from_metrics(outcome.metrics)
            except ValueError as exc:
                failures[outcome.node_id] = f"bad feature stats: {exc}"
    if not answers:
        raise ValueError(f"no node sent feature stats; failures: {failures or 'none'}")
    return merge_all(answers[n] for n in sorted(answers))


# ------------------------------------------------------------- client side


@dataclass(frozen=True)
class Normalizer:
    """``(x - shift) / scale`` per feature: shift/scale are mean/std (``standard``) or min/range (``minmax``)."""

    method: str
    shift: np.ndarray
    scale: np.ndarray

    def to_config(self) -> dict[str, Any]:
        a, b = ("mean", "std") if self.method == "standard" else ("min", "range")
        out: dict[str, Any] = {f"{NORM}method": self.method, f"{NORM}features": len(self.shift)}
        out.update({f"{NORM}{a}/{j}": float(v) for j, v in enumerate(self.shift)})
        out.update({f"{NORM}{b}/{j}": float(v) for j, v in enumerate(self.scale)})
        return out

    @classmethod
    def from_config(cls, config: Config) -> Normalizer | None:
        """The normalization a config carries, or None when it has no ``norm/`` keys."""
        keys = {k: v for k, v in config.items() if k.startswith(NORM)}
        if not keys:
            return None
        method = keys.get(f"{NORM}method")
        if method not in METHODS:
            raise ValueError(f"{NORM}method must be one of {', '.join(METHODS)}, got {method!r}")
        d = _int(f"{NORM}features", keys.get(f"{NORM}features", -1), low=1, high=MAX_FEATURES)
        a, b = ("mean", "std") if method == "standard" else ("min", "range")
        shift, scale = np.full(d, np.nan), np.full(d, np.nan)
        for key, value in keys.items():
            tag, _, index = key[len(NORM):].partition("/")
            if tag in ("method", "features") and not index:
                continue
            target = {a: shift, b: scale}.get(tag)
            if target is None or not index.isdigit() or int(index) >= d:
                raise ValueError(f"unexpected normalization key {key!r} for {method} over {d} features")
            target[int(index)] = float(value)
        if not (np.isfinite(shift).all() and np.isfinite(scale).all()):
            raise ValueError(f"normalization lacks values or has non-finite ones ({a}/{b} for {d} features)")
        if (scale <= 0).any():
            raise ValueError(f"normalization {b} must be positive")
        return cls(method, shift, scale)

    def apply(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Normalized rows of ``x`` (N x ..., flattened per row for the features), same type, shape and dtype."""
        width = int(np.prod(x.shape[1:]))
        if width != len(self.shift):
            raise ValueError(f"normalization is for {len(self.shift)} features, data has {width}")
        if isinstance(x, np.ndarray):
            flat = (x.reshape(len(x), -1) - self.shift) / self.scale
            return flat.astype(x.dtype, copy=False).reshape(x.shape)
        import torch

        shift = torch.as_tensor(self.shift, dtype=x.dtype, device=x.device)
        scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        return ((x.reshape(len(x), -1) - shift) / scale).reshape(x.shape)

    def same(self, other: Normalizer | None) -> bool:
        return (other is not None and other.method == self.method and np.array_equal(other.shift, self.shift)
                and np.array_equal(other.scale, self.scale))
