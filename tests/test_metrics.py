"""Classification metrics from sufficient statistics: hand-computed values, exact aggregation, scikit-learn parity."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, precision_recall_fscore_support, roc_auc_score

from fedloom import metrics as M


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _quantized_probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """Probabilities that are multiples of 1/8: exact in binary, so bins=1000 separates every distinct value."""
    cuts = np.sort(rng.integers(0, 9, size=(n, c - 1)), axis=1)
    parts = np.diff(np.concatenate([np.zeros((n, 1), int), cuts, np.full((n, 1), 8)], axis=1), axis=1)
    return parts / 8.0


def test_hand_computed_three_classes():
    labels = np.array([0, 1, 2, 2, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.1, 0.5, 0.4], [0.3, 0.6, 0.1]])
    stats = M.class_stats(probs, labels, num_classes=3, bins=10)
    # predicted: 0, 2, 2, 1, 1
    assert M.confusion(stats).tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    out = M.compute(stats)
    # per class precision = recall = f1 = [1, 1/2, 1/2]; supports [1, 2, 2]
    assert out["accuracy"] == pytest.approx(3 / 5)
    for name in ("precision", "recall", "f1"):
        assert out[f"{name}_macro"] == pytest.approx(2 / 3)
        assert out[f"{name}_weighted"] == pytest.approx((1 + 2 * 0.5 + 2 * 0.5) / 5)
    # cross-entropy: -ln(0.7) - ln(0.3) - ln(0.6) - ln(0.4) - ln(0.6), averaged over 5
    assert out["loss"] == pytest.approx(-np.log([0.7, 0.3, 0.6, 0.4, 0.6]).sum() / 5)
    # class 0 positives {0.7}, negatives {0.1, 0.2, 0.1, 0.3}: AUC 1
    # class 1 positives {0.3, 0.6}, negatives {0.2, 0.2, 0.5}: (2 + 3) / 6
    # class 2 positives {0.6, 0.4}, negatives {0.1, 0.6, 0.1}: 0.6 vs (2 wins + half tie) + 0.4 vs 2 wins = 4.5 / 6
    assert out["auc"] == pytest.approx((1 + 5 / 6 + 0.75) / 3)


def test_binary_scores_hand_computed_auc():
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])  # pairs: 0.35>0.1, 0.35<0.4, 0.8>both -> 3/4
    stats = M.class_stats(p1, labels, num_classes=2, bins=100)
    assert stats.pos.shape == (1, 100)  # binary: only class 1 is scored
    assert M.confusion(stats).tolist() == [[2, 0], [1, 1]]
    out = M.compute(stats)
    assert out["auc"] == 0.75
    assert out["accuracy"] == 0.75
    # class 0: precision 2/3, recall 1; class 1: precision 1, recall 1/2
    assert out["precision_macro"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["recall_macro"] == pytest.approx(0.75)


def test_binary_logits_equal_probabilities():
    labels = np.array([0, 1, 1, 0, 1])
    logits = np.array([-2.0, 0.3, 1.5, 0.2, -0.4])
    p1 = 1 / (1 + np.exp(-logits))
    a = M.class_stats(logits, labels, num_classes=2)  # guessed as logits: values outside [0, 1]
    b = M.class_stats(p1, labels, num_classes=2, from_logits=False)
    two_column = M.class_stats(np.stack([np.zeros(5), logits], 1), labels, num_classes=2, from_logits=True)
    for s in (b, two_column):
        assert np.array_equal(a.confusion, s.confusion) and np.array_equal(a.pos, s.pos)
        assert a.loss_sum == pytest.approx(s.loss_sum)
    assert a.loss_sum == pytest.approx(log_loss(labels, p1) * 5)


def _pooled_and_split(rng: np.random.Generator, n: int, c: int, cuts: list[int]):
    labels = rng.integers(0, c, n)
    labels[:c] = np.arange(c)  # every class occurs in the pooled data
    probs = _quantized_probs(rng, n, c)
    parts = np.split(np.arange(n), cuts)
    clients = [M.class_stats(probs[i], labels[i], num_classes=c) for i in parts]
    return labels, probs, clients


@pytest.mark.parametrize("c", [2, 3, 7])
@pytest.mark.parametrize("cuts", [[1, 2], [10, 11, 40, 90], [30]])
def test_merged_clients_equal_pooled_data(c, cuts):
    rng = np.random.default_rng(c * 100 + len(cuts))
    labels, probs, clients = _pooled_and_split(rng, 120, c, cuts)
    pooled = M.class_stats(probs, labels, num_classes=c)
    merged = M.merge_all(clients)
    assert np.array_equal(merged.confusion, pooled.confusion)
    assert np.array_equal(merged.pos, pooled.pos) and np.array_equal(merged.neg, pooled.neg)
    got, want = M.compute(merged), M.compute(pooled)
    assert got.pop("loss") == pytest.approx(want.pop("loss"), rel=1e-12)
    assert got == want  # bit-identical: same counts, same arithmetic
    averaged_accuracy = np.mean([M.compute(s)["accuracy"] for s in clients])  # what one must not do
    assert averaged_accuracy != pytest.approx(want["accuracy"], abs=1e-9)


@pytest.mark.parametrize("c", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_sklearn_on_pooled_data(c, seed):
    rng = np.random.default_rng(seed)
    labels, probs, clients = _pooled_and_split(rng, 200, c, [17, 60, 150])
    out = M.compute(M.merge_all(clients))
    preds = probs.argmax(axis=1)
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, average=average, zero_division=0)
        assert (out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"]) == pytest.approx(
            (p, r, f), abs=1e-12)
    auc = roc_auc_score(labels, probs[:, 1]) if c == 2 else roc_auc_score(labels, probs, multi_class="ovr")
    assert out["auc"] == pytest.approx(auc, abs=1e-12)  # scores on distinct bins: exact
    assert out["accuracy"] == pytest.approx(np.mean(preds == labels), abs=1e-12)
    assert out["loss"] == pytest.approx(log_loss(labels, np.clip(probs, 1e-15, 1), labels=list(range(c))), rel=1e-9)


@pytest.mark.parametrize("bins", [50, 1000])
@pytest.mark.parametrize("c", [2, 4])
def test_auc_of_continuous_scores_within_bin_width(bins, c):
    rng = np.random.default_rng(bins + c)
    labels = rng.integers(0, c, 500)
    probs = _softmax(rng.normal(size=(500, c)) + 1.5 * np.eye(c)[labels])
    clients = [M.class_stats(probs[i], labels[i], num_classes=c, bins=bins) for i in np.split(np.arange(500), [99])]
    want = roc_auc_score(labels, probs[:, 1]) if c == 2 else roc_auc_score(labels, probs, multi_class="ovr")
    assert abs(M.compute(M.merge_all(clients))["auc"] - want) <= 1 / bins


def test_auc_left_out_when_undefined_and_classes_absent_from_macro():
    stats = M.class_stats(np.array([[0.9, 0.1, 0.0]] * 3), np.array([0, 0, 0]), num_classes=3)
    out = M.compute(stats)
    assert "auc" not in out  # class 0 has no negatives; 1 and 2 no positives
    assert out["precision_macro"] == 1.0  # classes 1 and 2 occur neither in labels nor predictions


def test_dict_encoding_round_trips_and_is_sparse():
    rng = np.random.default_rng(3)
    labels, probs, _ = _pooled_and_split(rng, 40, 10, [])
    stats = M.class_stats(probs, labels, num_classes=10, bins=1000)
    encoded = M.to_dict(stats)
    # 3 header keys, at most 40 confusion cells, and per class at most 40 non-zero bins in pos + neg
    assert len(encoded) <= 3 + 40 + 10 * 40
    assert len(encoded) < 2 * 10 * 1000 / 20
    back = M.from_dict({**encoded, "accuracy": 0.5})
    assert np.array_equal(back.confusion, stats.confusion) and np.array_equal(back.pos, stats.pos)
    assert np.array_equal(back.neg, stats.neg) and back.loss_sum == stats.loss_sum
    found, rest = M.split_stats({**encoded, "accuracy": 0.5})
    assert rest == {"accuracy": 0.5} and found is not None and found.count == 40
    assert M.split_stats({"accuracy": 0.5}) == (None, {"accuracy": 0.5})


@pytest.mark.parametrize("change, message", [
    ({"stats/cm/0/0": -1.0}, "non-negative integer"),
    ({"stats/cm/0/0": 1.5}, "non-negative integer"),
    ({"stats/cm/5/0": 1.0}, "unexpected stats key"),
    ({"stats/pos/0": 1.0}, "unexpected stats key"),
    ({"stats/what/0/0": 1.0}, "unexpected stats key"),
    ({"stats/classes": 1e6, "stats/bins": 1e6}, "implausible"),
    ({"stats/cm/1/1": 7.0}, "inconsistent"),
])
def test_malformed_dicts_are_rejected(change, message):
    stats = M.class_stats(np.array([0.2, 0.7, 0.6]), np.array([0, 1, 1]), num_classes=2, bins=10)
    with pytest.raises(ValueError, match=message):
        M.from_dict({**M.to_dict(stats), **change})
    with pytest.raises(ValueError, match="missing"):
        M.from_dict({"stats/cm/0/0": 1.0})


def test_tensor_round_trip():
    stats = M.class_stats(np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]), np.array([2, 1]), num_classes=3, bins=20)
    back = M.from_tensors(M.to_tensors(stats))
    assert np.array_equal(back.confusion, stats.confusion) and back.loss_sum == stats.loss_sum
    bad = dict(M.to_tensors(stats))
    bad["pos"] = bad["pos"] * 2
    with pytest.raises(ValueError, match="inconsistent"):
        M.from_tensors(bad)


def test_errors():
    with pytest.raises(ValueError, match="labels"):
        M.class_stats(np.eye(3), np.array([0, 1, 3]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        M.class_stats(np.eye(3), np.array([0, 1, 2]), num_classes=4)
    with pytest.raises(ValueError, match="no examples"):
        M.compute(M.empty(3))
    with pytest.raises(ValueError, match="cannot merge"):
        M.merge(M.empty(3), M.empty(3, bins=10))


@pytest.mark.parametrize("c", [2, 4])
def test_evaluate_stats_with_torch(c):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, c)
    x, y = torch.randn(37, 5), torch.randint(0, c, (37,))
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 37, 10)]
    stats = M.evaluate_stats(model, batches, c, bins=100)
    with torch.no_grad():
        logits = model(x)
        loss = float(torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum"))
    want = M.class_stats(logits.double().numpy(), y.numpy(), num_classes=c, bins=100, from_logits=True)
    assert np.array_equal(stats.confusion, want.confusion) and np.array_equal(stats.pos, want.pos)
    assert stats.loss_sum == pytest.approx(loss, rel=1e-12)
    assert model.training  # left as it was found
