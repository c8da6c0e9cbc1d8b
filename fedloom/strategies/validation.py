"""Validation: reject bad client updates, stop early, remember the best round.

Update validation pieces are Pre steps: a rejected update raises
``Rejected(reason)``, the driver records the reason among the round's
failures and the round goes on without it. ``early_stopping`` and
``best_model`` are small explicit-state objects the driver feeds each round's
metrics to; they are data in, data out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedloom.strategies.pipeline import Pre, Rejected, RoundInfo, Update, check_finite, check_structure
from fedloom.tensors import NamedTensors, is_float

__all__ = ["BestModel", "EarlyStopping", "best_model", "check_finite", "check_norm_outliers", "check_structure",
           "delta_norm", "early_stopping", "modified_z", "validate_updates"]


def delta_norm(update: Update, global_weights: NamedTensors) -> float:
    """L2 norm of (update - global) over all floating tensors together, in float64."""
    total = 0.0
    for name, array in update.weights.items():
        if is_float(array.dtype):
            if name not in global_weights:
                raise Rejected(f"unexpected parameter {name!r}")
            d = array.astype(np.float64) - global_weights[name].astype(np.float64)
            total += float(np.vdot(d, d))
    return math.sqrt(total)


def modified_z(x: float, reference: np.ndarray) -> float:
    """Iglewicz and Hoaglin's modified z-score of ``x`` against ``reference``: 0.6745 (x - median) / MAD.

    When the MAD is 0 (over half the reference is identical) it falls back to
    (x - median) / (1.253314 * mean absolute deviation); when that is 0 too,
    any x other than the median is infinitely far.
    """
    med = float(np.median(reference))
    dev = np.abs(reference - med)
    mad = float(np.median(dev))
    if mad > 0:
        return 0.6745 * (x - med) / mad
    mean_ad = float(dev.mean())
    if mean_ad > 0:
        return (x - med) / (1.253314 * mean_ad)
    return 0.0 if x == med else math.copysign(math.inf, x - med)


@dataclass(frozen=True)
class _NormOutliers:
    z_threshold: float
    min_cohort: int
    window: int
    include_rejected: bool

    def init(self, weights: NamedTensors) -> dict:
        return {"norms": (), "pending": [], "rejected": 0, "last_rejected": 0}

    def apply(self, state: dict, update: Update, global_weights: NamedTensors) -> tuple[Update, dict]:
        # The state dict is changed in place: a rejection raises, and must still be counted.
        norm = delta_norm(update, global_weights)
        reference = np.asarray(state["norms"], np.float64)
        z = modified_z(norm, reference) if len(reference) >= self.min_cohort else 0.0
        if abs(z) > self.z_threshold:
            state["rejected"] += 1
            if self.include_rejected:
                state["pending"].append(norm)
            raise Rejected(f"update norm {norm:.4g} is an outlier (modified z {z:.3g}, |z| > {self.z_threshold:g}; "
                           f"median of the last {len(reference)} norms {float(np.median(reference)):.4g})")
        state["pending"].append(norm)
        return update, state

    def end_round(self, state: dict, info: RoundInfo) -> dict:
        # Sorted, so the window does not depend on the order in which updates arrived.
        norms = (*state["norms"], *sorted(state["pending"]))[-self.window:]
        return {"norms": norms, "pending": [], "rejected": 0, "last_rejected": state["rejected"]}

    def metrics(self, state: dict) -> dict[str, float]:
        out = {"norm_outliers_rejected": float(state["last_rejected"])}
        if state["norms"]:
            out["norm_median"] = float(np.median(state["norms"]))
        return out


def check_norm_outliers(*, z_threshold: float = 3.5, min_cohort: int = 5, window: int = 200,
                        include_rejected: bool = False) -> Pre:
    """Reject updates whose delta norm ||update - global|| is far from the cohort's (|modified z| > threshold).

    Updates stream in one at a time, so the reference cohort is the norms of
    previous rounds' accepted updates (the last ``window`` of them), and
    nothing is judged until it holds ``min_cohort`` norms. Judging only
    against previous rounds keeps each decision independent of arrival order
    within a round, hence identical across fleets. Both unusually large
    (scaled, boosted) and unusually small (free-riding) updates are rejected.

    Caveat: if the honest norms jump at once (say the learning rate is raised
    tenfold) every update may be rejected and, with accepted norms only, the
    reference never catches up. ``include_rejected=True`` also records the
    rejected norms, so the reference follows such a jump within about
    ``window / 2`` updates, relying on the median's robustness while fewer
    than half of the updates are bad.
    """
    if not z_threshold > 0:
        raise ValueError(f"z_threshold must be positive, got {z_threshold}")
    if min_cohort < 2 or window < min_cohort:
        raise ValueError(f"need 2 <= min_cohort <= window, got min_cohort={min_cohort}, window={window}")
    return _NormOutliers(float(z_threshold), int(min_cohort), int(window), bool(include_rejected))


def validate_updates(*, norm_outliers: bool = True, z_threshold: float = 3.5, min_cohort: int = 5,
                     window: int = 200) -> tuple[Pre, ...]:
    """The usual update checks, in order: structure, finiteness, then (optionally) norm outliers."""
    pieces: tuple[Pre, ...] = (check_structure(), check_finite())
    if norm_outliers:
        pieces += (check_norm_outliers(z_threshold=z_threshold, min_cohort=min_cohort, window=window),)
    return pieces


# ------------------------------------------------------------- round-level


def _better(value: float, best: float | None, *, mode: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _value(metrics: Mapping[str, float], metric: str) -> float | None:
    if metric not in metrics:
        return None
    return float(metrics[metric])


def _check_mode(mode: str, missing: str) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")


def _missing(metric: str, metrics: Mapping[str, float]) -> KeyError:
    return KeyError(f"metric {metric!r} not in this round's metrics (have: {', '.join(sorted(metrics)) or 'none'})")


@dataclass(frozen=True)
class BestModel:
    """Tracks the round with the best value of ``metric``; ties keep the earlier round."""

    metric: str = "accuracy"
    mode: str = "max"
    missing: str = "error"

    def init(self) -> dict:
        return {"round": None, "value": None}

    def update(self, state: dict, metrics: Mapping[str, float], *, round: int) -> tuple[dict, bool]:
        """(new state, whether this round is the new best). The caller saves the weights when it is."""
        value = _value(metrics, self.metric)
        if value is None:
            if self.missing == "error":
                raise _missing(self.metric, metrics)
            return state, False
        if not _better(value, state["value"], mode=self.mode, min_delta=0.0):
            return state, False
        return {"round": round, "value": value}, True


def best_model(*, metric: str = "accuracy", mode: str = "max", missing: str = "error") -> BestModel:
    """Best-checkpoint tracking on ``metric`` (``mode`` 'max' or 'min')."""
    _check_mode(mode, missing)
    return BestModel(metric, mode, missing)


@dataclass(frozen=True)
class EarlyStopping:
    """Stops after ``patience`` rounds in a row without an improvement of more than ``min_delta``."""

    metric: str = "accuracy"
    mode: str = "max"
    patience: int = 5
    min_delta: float = 0.0
    missing: str = "error"

    def init(self) -> dict:
        return {"best": None, "best_round": None, "wait": 0, "rounds": 0}

    def update(self, state: dict, metrics: Mapping[str, float], *,
               round: int | None = None) -> tuple[dict, bool, bool]:
        """(new state, stop, improved). ``round`` defaults to the number of rounds seen.

        A missing metric raises KeyError (``missing='error'``), or leaves the
        state unchanged and does not count towards the patience (``'skip'``).
        A NaN value never improves.
        """
        value = _value(metrics, self.metric)
        if value is None:
            if self.missing == "error":
                raise _missing(self.metric, metrics)
            return state, False, False
        rounds = state["rounds"] + 1
        rnd = rounds if round is None else round
        if _better(value, state["best"], mode=self.mode, min_delta=self.min_delta):
            return {"best": value, "best_round": rnd, "wait": 0, "rounds": rounds}, False, True
        wait = state["wait"] + 1
        new = {**state, "wait": wait, "rounds": rounds}
        return new, wait >= self.patience, False


def early_stopping(*, metric: str = "accuracy", mode: str = "max", patience: int = 5, min_delta: float = 0.0,
                   missing: str = "error") -> EarlyStopping:
    """Early stopping on ``metric`` (``mode`` 'max' or 'min'); see ``EarlyStopping.update``."""
    _check_mode(mode, missing)
    if patience < 0 or min_delta < 0:
        raise ValueError(f"patience and min_delta must be >= 0, got {patience}, {min_delta}")
    return EarlyStopping(metric, mode, int(patience), float(min_delta), missing)
