"""Classification metrics from sufficient statistics, so they aggregate exactly across clients.

Each client reduces its predictions to a ``ClassStats``: the confusion matrix,
the loss sum and, for AUC, per-class histograms of the predicted probability
of positive and negative examples over fixed equal bins of [0, 1]. Stats are
merged by plain sums, so ``compute(merge_all(per_client))`` equals
``compute(class_stats(pooled data))`` -- never an average of ratios.

AUC from histograms treats scores in the same bin as ties (half credit, as
scikit-learn does for equal scores): it is exact when every pair of distinct
scores falls in distinct bins, and otherwise off by at most half the fraction
of positive/negative pairs that share a bin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedloom.tensors import NamedTensors

if TYPE_CHECKING:
    import torch

DEFAULT_BINS = 1000
PREFIX = "stats/"  # metric keys that carry stats (not means) start with this
MAX_CELLS = 10_000_000  # classes * bins cap for stats decoded from untrusted clients


@dataclass(frozen=True)
class ClassStats:
    """Sufficient statistics of a classifier's predictions.

    ``confusion[i, j]`` counts examples of true class i predicted as j.
    ``pos[h, b]`` / ``neg[h, b]`` count examples whose probability of scored
    class h falls in bin b, among examples of that class / of the others. The
    scored classes are all classes, except for binary tasks where only class 1
    is scored (class 0's histograms mirror it).
    """

    confusion: np.ndarray  # (C, C) int64
    pos: np.ndarray  # (H, bins) int64, H = 1 if C == 2 else C
    neg: np.ndarray  # (H, bins) int64
    loss_sum: float = 0.0

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    @property
    def bins(self) -> int:
        return self.pos.shape[1]

    @property
    def count(self) -> int:
        return int(self.confusion.sum())


def _scored(num_classes: int) -> list[int]:
    return [1] if num_classes == 2 else list(range(num_classes))


def empty(num_classes: int, *, bins: int = DEFAULT_BINS) -> ClassStats:
    """Stats of no examples: the identity of ``merge``."""
    if num_classes < 2 or bins < 1:
        raise ValueError(f"need num_classes >= 2 and bins >= 1, got {num_classes}, {bins}")
    h = len(_scored(num_classes))
    return ClassStats(np.zeros((num_classes, num_classes), np.int64), np.zeros((h, bins), np.int64),
                      np.zeros((h, bins), np.int64), 0.0)


def _softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, log-probabilities) of rows of logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return np.exp(log_probs), log_probs


def _probabilities(scores: np.ndarray, num_classes: int, from_logits: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) probabilities and their logs, from probabilities or logits, (N, C) or binary (N,)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim == 1:
        if num_classes != 2:
            raise ValueError(f"one score per example means a binary task, but num_classes={num_classes}")
        if from_logits is None:
            from_logits = not bool(np.all((s >= 0) & (s <= 1)))
        s = np.stack([np.zeros_like(s), s], axis=1) if from_logits else np.stack([1.0 - s, s], axis=1)
    if s.ndim != 2 or s.shape[1] != num_classes:
        raise ValueError(f"expected scores of shape (N, {num_classes}) or (N,), got {list(np.shape(scores))}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    if from_logits is None:
        from_logits = not (s.min(initial=0) >= 0 and s.max(initial=1) <= 1 and np.allclose(s.sum(1), 1, atol=1e-3))
    if from_logits:
        return _softmax(s)
    return s, np.log(np.maximum(s, 1e-15))  # a zero probability for the true class costs 34.5, not inf


def class_stats(scores: np.ndarray, labels: np.ndarray, *, num_classes: int, loss_sum: float | None = None,
                bins: int = DEFAULT_BINS, from_logits: bool | None = None) -> ClassStats:
    """Stats of one batch or one client's data.

    ``scores`` are probabilities or logits, (N, C), or for a binary task (N,)
    scores of class 1 (a probability, or a logit for the sigmoid). With
    ``from_logits=None`` it is guessed: rows of values in [0, 1] that sum to 1
    (or, for (N,), values in [0, 1]) are probabilities. ``loss_sum=None``
    computes the cross-entropy sum (natural log) from the scores.
    """
    probs, log_probs = _probabilities(scores, num_classes, from_logits)
    y = np.asarray(labels)
    if y.shape != (len(probs),) or (y.size and (y.dtype.kind not in "iub" or y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"labels must be {len(probs)} integers in [0, {num_classes}), got {y.dtype}{list(y.shape)}")
    y = y.astype(np.int64)
    stats = empty(num_classes, bins=bins)
    preds = probs.argmax(axis=1)
    stats.confusion[...] = np.bincount(y * num_classes + preds, minlength=num_classes**2).reshape(num_classes, -1)
    for h, c in enumerate(_scored(num_classes)):
        idx = np.minimum((np.clip(probs[:, c], 0.0, 1.0) * bins).astype(np.int64), bins - 1)
        positive = y == c
        stats.pos[h] = np.bincount(idx[positive], minlength=bins)
        stats.neg[h] = np.bincount(idx[~positive], minlength=bins)
    if loss_sum is None:
        loss_sum = float(-log_probs[np.arange(len(y)), y].sum()) if len(y) else 0.0
    return ClassStats(stats.confusion, stats.pos, stats.neg, float(loss_sum))


def merge(a: ClassStats, b: ClassStats) -> ClassStats:
    """The stats of the union of two disjoint sets of examples."""
    if a.confusion.shape != b.confusion.shape or a.pos.shape != b.pos.shape:
        raise ValueError(f"cannot merge stats of {a.num_classes} classes x {a.bins} bins with "
                         f"{b.num_classes} classes x {b.bins} bins")
    return ClassStats(a.confusion + b.confusion, a.pos + b.pos, a.neg + b.neg, a.loss_sum + b.loss_sum)


def merge_all(stats: Iterable[ClassStats]) -> ClassStats:
    items = list(stats)
    if not items:
        raise ValueError("merge_all needs at least one ClassStats")
    out = items[0]
    for s in items[1:]:
        out = merge(out, s)
    return out


def confusion(stats: ClassStats) -> np.ndarray:
    """The confusion matrix (rows: true class, columns: predicted class), a copy."""
    return stats.confusion.copy()


def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Area under the ROC curve from score histograms; ties within a bin count half."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.concatenate([[0], np.cumsum(neg)[:-1]]).astype(np.float64)
    pos = pos.astype(np.float64)
    wins = float(pos @ neg_below) + 0.5 * float(pos @ neg)
    return wins / (n_pos * n_neg)


def compute(stats: ClassStats) -> dict[str, float]:
    """loss, accuracy, precision/recall/F1 (macro and weighted) and AUC-ROC.

    Macro averages run over the classes that occur in the labels or the
    predictions (scikit-learn's default); an undefined precision or recall
    (no predictions / no examples of the class) counts as 0. ``auc`` is the
    AUC of class 1 for a binary task, else the one-vs-rest macro AUC over
    classes with both positive and negative examples; it is left out when no
    class has both.
    """
    n = stats.count
    if n == 0:
        raise ValueError("no examples: metrics are undefined")
    cm = stats.confusion.astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=present)
    out = {"loss": stats.loss_sum / n, "accuracy": float(tp.sum()) / n}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"{name}_macro"] = float(values[present].mean())
        out[f"{name}_weighted"] = float(values @ support) / n
    aucs = [a for a in (_auc(p, q) for p, q in zip(stats.pos, stats.neg, strict=True)) if a is not None]
    if aucs:
        out["auc"] = float(np.mean(aucs))
    return out


# ------------------------------------------------------------- conversions


def to_dict(stats: ClassStats, *, prefix: str = PREFIX) -> dict[str, float]:
    """A flat metrics dict (for ``EvalRes.metrics``); only non-zero cells and bins are listed.

    Keys: ``{prefix}classes``, ``bins``, ``loss``, ``cm/i/j``, ``pos/h/b``, ``neg/h/b``.
    """
    out = {f"{prefix}classes": float(stats.num_classes), f"{prefix}bins": float(stats.bins),
           f"{prefix}loss": float(stats.loss_sum)}
    for tag, array in (("cm", stats.confusion), ("pos", stats.pos), ("neg", stats.neg)):
        for i, j in zip(*np.nonzero(array), strict=True):
            out[f"{prefix}{tag}/{i}/{j}"] = float(array[i, j])
    return out


def _count(key: str, value: Any) -> int:
    v = float(value)
    if not (math.isfinite(v) and v >= 0 and v == int(v)):
        raise ValueError(f"{key}: expected a non-negative integer count, got {value!r}")
    return int(v)


def from_dict(metrics: Mapping[str, float], *, prefix: str = PREFIX) -> ClassStats:
    """Stats from ``to_dict``'s encoding; checks everything, since it comes from clients."""
    try:
        c, bins = _count("classes", metrics[f"{prefix}classes"]), _count("bins", metrics[f"{prefix}bins"])
        loss = float(metrics[f"{prefix}loss"])
    except KeyError as exc:
        raise ValueError(f"metrics carry no complete stats: {exc} missing") from None
    if c < 2 or bins < 1 or c * max(c, bins) > MAX_CELLS:
        raise ValueError(f"implausible stats size: {c} classes x {bins} bins")
    stats = empty(c, bins=bins)
    arrays = {"cm": stats.confusion, "pos": stats.pos, "neg": stats.neg}
    for key, value in metrics.items():
        if not key.startswith(prefix) or key[len(prefix):] in ("classes", "bins", "loss"):
            continue
        tag, *index = key[len(prefix):].split("/")
        array = arrays.get(tag)
        try:
            i, j = (int(x) for x in index)
            if array is None or not (0 <= i < array.shape[0] and 0 <= j < array.shape[1]):
                raise ValueError
        except ValueError:
            raise ValueError(f"unexpected stats key {key!r} for {c} classes x {bins} bins") from None
        array[i, j] = _count(key, value)
    _check_consistent(stats)
    return ClassStats(stats.confusion, stats.pos, stats.neg, loss)


def _check_consistent(stats: ClassStats) -> None:
    support = stats.confusion.sum(axis=1)[_scored(stats.num_classes)]
    if not (np.array_equal(stats.pos.sum(axis=1), support)
            and np.array_equal(stats.neg.sum(axis=1), stats.count - support)):
        raise ValueError("inconsistent stats: histogram totals do not match the confusion matrix")


def split_stats(metrics: Mapping[str, float], *, prefix: str = PREFIX) -> tuple[ClassStats | None, dict[str, float]]:
    """(stats encoded in ``metrics`` or None, the other metrics)."""
    rest = {k: v for k, v in metrics.items() if not k.startswith(prefix)}
    if len(rest) == len(metrics):
        return None, rest
    return from_dict(metrics, prefix=prefix), rest


def to_tensors(stats: ClassStats) -> NamedTensors:
    """Stats as named tensors (for checkpoints or a tensor channel)."""
    return NamedTensors({"confusion": stats.confusion, "pos": stats.pos, "neg": stats.neg,
                         "loss_sum": np.array(stats.loss_sum, np.float64)})


def from_tensors(tensors: Mapping[str, np.ndarray]) -> ClassStats:
    cm = np.asarray(tensors["confusion"], np.int64)
    pos, neg = np.asarray(tensors["pos"], np.int64), np.asarray(tensors["neg"], np.int64)
    c = cm.shape[0] if cm.ndim == 2 else 0
    if cm.shape != (c, c) or c < 2 or pos.shape != neg.shape or pos.shape[:1] != (len(_scored(c)),):
        raise ValueError(f"malformed stats tensors: {list(cm.shape)}, {list(pos.shape)}, {list(neg.shape)}")
    if min(cm.min(), pos.min(initial=0), neg.min(initial=0)) < 0:
        raise ValueError("stats counts must be non-negative")
    stats = ClassStats(cm, pos, neg, float(np.asarray(tensors["loss_sum"])))
    _check_consistent(stats)
    return stats


# ------------------------------------------------------------------ torch


def evaluate_stats(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   *, bins: int = DEFAULT_BINS) -> ClassStats:
    """Stats of a classifier over (inputs, labels) batches; the loss is cross-entropy (sum).

    The model returns logits, (N, C), or for a binary task (N,) / (N, 1) logits of class 1.
    """
    import torch

    stats = empty(num_classes, bins=bins)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                logits = model(x).detach().to("cpu", torch.float64).numpy()
                stats = merge(stats, class_stats(logits, y.detach().cpu().numpy(), num_classes=num_classes,
                                                 bins=bins, from_logits=True))
    finally:
        model.train(was_training)
    return stats
