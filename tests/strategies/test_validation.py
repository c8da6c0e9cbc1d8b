"""Update validation (norm outliers), early stopping and best-model tracking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedloom.fleet import InProcessFleet
from fedloom.server import runstate
from fedloom.server.driver import Driver, RunConfig
from fedloom.strategies import Rejected, RoundInfo, Strategy, Update, weighted_mean
from fedloom.strategies.validation import (
    best_model,
    check_norm_outliers,
    delta_norm,
    early_stopping,
    modified_z,
    validate_updates,
)
from fedloom.tensors import NamedTensors

G = NamedTensors({"w": np.zeros(2, np.float32), "steps": np.zeros((), np.int64)})


def _update(node: str, dx: float, dy: float = 0.0, steps: int = 0) -> Update:
    return Update(node, NamedTensors({"w": np.array([dx, dy], np.float32), "steps": np.array(steps, np.int64)}), 10)


def _round(piece, state, updates, rnd=1):
    """Run one round of a lone piece; returns (accepted ids, rejection reasons, state)."""
    accepted, reasons = [], {}
    for u in updates:
        try:
            _, state = piece.apply(state, u, G)
            accepted.append(u.node_id)
        except Rejected as exc:
            reasons[u.node_id] = exc.reason
    return accepted, reasons, piece.end_round(state, RoundInfo(rnd, len(accepted), float(len(accepted))))


def test_delta_norm_ignores_integer_tensors():
    assert delta_norm(_update("a", 3.0, 4.0, steps=100), G) == 5.0


@pytest.mark.parametrize("x, reference, want", [
    # median 3, |dev| = [2, 1, 0, 1, 2] -> MAD 1: 0.6745 * (10 - 3) / 1
    (10.0, [1.0, 2.0, 3.0, 4.0, 5.0], 0.6745 * 7),
    # median 2, |dev| = [0, 0, 0, 8] -> MAD 0, mean AD 2: (4 - 2) / (1.253314 * 2)
    (4.0, [2.0, 2.0, 2.0, 10.0], 2 / (1.253314 * 2)),
    (2.0, [2.0, 2.0, 2.0], 0.0),
    (2.5, [2.0, 2.0, 2.0], math.inf),
    (1.5, [2.0, 2.0, 2.0], -math.inf),
])
def test_modified_z_hand_computed(x, reference, want):
    assert modified_z(x, np.array(reference)) == pytest.approx(want)


def test_nothing_is_judged_until_the_cohort_is_full():
    piece = check_norm_outliers(min_cohort=5)
    state = piece.init(G)
    accepted, _, state = _round(piece, state, [_update("a", 1.0), _update("b", 1.1), _update("huge", 1000.0)])
    assert accepted == ["a", "b", "huge"]  # only 0 norms of earlier rounds: no judgement
    assert state["norms"] == pytest.approx((1.0, 1.1, 1000.0))


def test_outliers_rejected_against_previous_rounds():
    piece = check_norm_outliers(z_threshold=3.5, min_cohort=5)
    state = piece.init(G)
    # reference norms 1.0 .. 1.4: median 1.2, MAD 0.1 -> |z| > 3.5 beyond 1.2 +- 0.519
    _, _, state = _round(piece, state, [_update(f"c{i}", 1.0 + i / 10) for i in range(5)])
    honest = [_update("ok_low", 0.7), _update("ok_high", 0.0, 1.7)]
    bad = [_update("scaled", 30.0), _update("free_rider", 0.0), _update("edge", 1.75)]
    accepted, reasons, state = _round(piece, state, [bad[0], honest[0], bad[1], honest[1], bad[2]], rnd=2)
    assert accepted == ["ok_low", "ok_high"]
    assert set(reasons) == {"scaled", "free_rider", "edge"}
    assert "outlier" in reasons["scaled"] and "median of the last 5 norms 1.2" in reasons["scaled"]
    assert piece.metrics(state)["norm_outliers_rejected"] == 3.0
    assert state["norms"][-2:] == pytest.approx((0.7, 1.7))  # accepted ones join the reference, sorted


def test_decisions_and_window_do_not_depend_on_arrival_order():
    piece = check_norm_outliers(min_cohort=5, window=7)
    warm = [_update(f"c{i}", 1.0 + i / 10) for i in range(5)]
    updates = [_update("a", 1.3), _update("b", 9.0), _update("c", 0.9), _update("d", 1.1)]
    results = []
    for order in (updates, updates[::-1]):
        _, _, state = _round(piece, piece.init(G), warm)
        accepted, reasons, state = _round(piece, state, order, rnd=2)
        results.append((sorted(accepted), sorted(reasons), state["norms"]))
    assert results[0] == results[1]
    assert len(results[0][2]) == 7  # the window keeps the last 7 norms


@pytest.mark.parametrize("include_rejected, accepted_per_round", [(False, [0, 0, 0]), (True, [0, 5, 5])])
def test_include_rejected_lets_the_reference_follow_a_jump(include_rejected, accepted_per_round):
    piece = check_norm_outliers(min_cohort=5, window=10, include_rejected=include_rejected)
    state = piece.init(G)
    _, _, state = _round(piece, state, [_update(f"c{i}", 1.0 + i / 100) for i in range(5)])
    jumped = [_update(n, 10.0 + i / 100) for i, n in enumerate("abcde")]
    counts = []
    for rnd in (2, 3, 4):
        accepted, _, state = _round(piece, state, jumped, rnd=rnd)
        counts.append(len(accepted))
    # with the rejected norms recorded, round 3's reference is five ~1 and five ~10: median ~5.5, MAD ~4.5
    assert counts == accepted_per_round


def test_validate_updates_in_a_driver_run_records_reasons_and_resumes(tmp_path):
    class Fixed:  # a trainer that adds a fixed delta to every weight
        def __init__(self, dx: float):
            self.dx = dx

        def fit(self, weights, config):
            return NamedTensors({"w": weights["w"] + np.float32(self.dx), "steps": weights["steps"]}), 1, {}

        def evaluate(self, weights, config):
            return 1, {}

    deltas = {"n0": 1.0, "n1": 1.1, "n2": 0.9, "n3": 1.05, "n4": 0.95, "bad": 50.0}
    fleet = InProcessFleet({k: Fixed(v) for k, v in deltas.items()})
    strategy = Strategy(name="validated", pre=validate_updates(min_cohort=5), aggregate=weighted_mean())
    driver = Driver(fleet, strategy, G, RunConfig(rounds=3, seed=1), checkpoint_dir=tmp_path)
    history = driver.run()
    fleet.close()
    first, *later = history.rounds
    assert "bad" not in first.failures and first.num_results == 6  # the cohort was not full yet
    # round 1's norms are sqrt(2) * [0.9, 0.95, 1.0, 1.05, 1.1, 50]: median 1.025 sqrt(2), MAD 0.075 sqrt(2);
    # "bad" scores 0.6745 * 48.975 / 0.075 = 440, the honest ones at most 0.6745 * 0.125 / 0.075 = 1.1
    for record in later:
        assert record.failures == {"bad": record.failures["bad"]}
        assert record.failures["bad"].startswith("rejected: update norm 70.7")
        assert record.num_results == 5 and record.metrics["norm_outliers_rejected"] == 1.0
    norms = driver.state["pre"][2]["norms"]
    assert len(norms) == 6 + 5 + 5
    restored = runstate.load(tmp_path).strategy["pre"][2]
    assert restored["norms"] == pytest.approx(norms) and restored["last_rejected"] == 1


@pytest.mark.parametrize("kwargs, error", [
    ({"z_threshold": 0}, "z_threshold"), ({"min_cohort": 1}, "min_cohort"), ({"min_cohort": 10, "window": 5}, "window"),
])
def test_norm_outlier_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        check_norm_outliers(**kwargs)


# ------------------------------------------------------------- early stopping


def _run(stopper, values, key="accuracy"):
    state, log = stopper.init(), []
    for v in values:
        state, stop, improved = stopper.update(state, {key: v})
        log.append((stop, improved))
        if stop:
            break
    return state, log


@pytest.mark.parametrize("mode, values, patience, min_delta, stop_at, best, best_round", [
    # max: best 0.5 at round 2, then 3 rounds without improvement -> stop at round 5
    ("max", [0.3, 0.5, 0.4, 0.5, 0.45, 0.9], 3, 0.0, 5, 0.5, 2),
    # min_delta 0.05: 0.52 and 0.54 are not improvements on 0.5; 0.56 would be, but patience runs out first
    ("max", [0.3, 0.5, 0.52, 0.54, 0.56], 2, 0.05, 4, 0.5, 2),
    # min: the loss falls, stalls once, falls again (wait resets), then stalls twice
    ("min", [2.0, 1.0, 1.0, 0.5, 0.6, 0.5], 2, 0.0, 6, 0.5, 4),
    # patience 0 stops at the first round without improvement
    ("min", [1.0, 0.9, 0.9], 0, 0.0, 3, 0.9, 2),
    # never stops while it keeps improving
    ("max", [0.1, 0.2, 0.3, 0.4], 1, 0.0, None, 0.4, 4),
    # NaN never improves and counts towards the patience
    ("min", [1.0, math.nan, math.nan], 2, 0.0, 3, 1.0, 1),
])
def test_early_stopping_sequences(mode, values, patience, min_delta, stop_at, best, best_round):
    stopper = early_stopping(metric="accuracy", mode=mode, patience=patience, min_delta=min_delta)
    state, log = _run(stopper, values)
    stops = [i + 1 for i, (stop, _) in enumerate(log) if stop]
    assert stops == ([] if stop_at is None else [stop_at])
    assert (state["best"], state["best_round"]) == (best, best_round)
    assert log[0] == (False, True)  # the first value is always an improvement


def test_early_stopping_missing_metric():
    strict = early_stopping(metric="auc")
    with pytest.raises(KeyError, match="'auc' not in this round's metrics \\(have: accuracy, loss\\)"):
        strict.update(strict.init(), {"accuracy": 0.5, "loss": 1.0})
    lenient = early_stopping(metric="auc", patience=1, missing="skip")
    state, stop, improved = lenient.update(lenient.init(), {"loss": 1.0})
    assert (state, stop, improved) == (lenient.init(), False, False)  # skipped rounds do not use up patience
    state, _, _ = lenient.update(state, {"auc": 0.7}, round=4)
    assert state["best_round"] == 4


def test_best_model_tracks_round_and_value():
    tracker = best_model(metric="loss", mode="min")
    state, seen = tracker.init(), []
    for rnd, loss in enumerate([1.0, 0.8, 0.8, 0.9, 0.3], start=1):
        state, improved = tracker.update(state, {"loss": loss}, round=rnd)
        seen.append(improved)
    assert seen == [True, True, False, False, True]  # a tie keeps the earlier round
    assert state == {"round": 5, "value": 0.3}
    with pytest.raises(KeyError, match="'loss'"):
        tracker.update(state, {}, round=6)


@pytest.mark.parametrize("kwargs", [{"mode": "up"}, {"patience": -1}, {"min_delta": -0.1}, {"missing": "ignore"}])
def test_early_stopping_arguments(kwargs):
    with pytest.raises(ValueError):
        early_stopping(**kwargs)
