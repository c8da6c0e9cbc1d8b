import math

import numpy as np
import pytest

from fedloom.fleet import InProcessFleet
from fedloom.server.driver import Driver, RunConfig
from fedloom.strategies import dp
from fedloom.strategies.accountant import RdpAccountant
from fedloom.strategies.dp import AdaptiveClip, clip_delta, clip_deltas, dp_fedavg, gaussian_noise, uniform_mean
from fedloom.strategies.pipeline import RoundInfo, Update
from fedloom.strategies.sampling import round_rng
from fedloom.tensors import NamedTensors


def nt(**arrays) -> NamedTensors:
    return NamedTensors({k: np.asarray(v) for k, v in arrays.items()})


ZERO = nt(w=np.zeros(2, np.float32), b=np.zeros(1, np.float32))


@pytest.mark.parametrize("clip, scale", [(1.0, 1 / 13), (13.0, 1.0), (100.0, 1.0), (6.5, 0.5)])
def test_clip_scales_the_joint_delta_norm(clip, scale):
    # delta = (3, 4 | 12): joint L2 norm 13
    glob = nt(w=np.array([1.0, 1.0], np.float32), b=np.array([-1.0], np.float32))
    upd = Update("a", nt(w=np.array([4.0, 5.0], np.float32), b=np.array([11.0], np.float32)), 7)
    out, norm = clip_delta(upd, glob, clip)
    assert norm == pytest.approx(13.0)
    np.testing.assert_allclose(out.weights["w"], [1 + 3 * scale, 1 + 4 * scale], rtol=1e-6)
    np.testing.assert_allclose(out.weights["b"], [-1 + 12 * scale], rtol=1e-6)
    assert out.weights["w"].dtype == np.float32 and out.num_examples == 7


def test_clip_keeps_global_values_of_integer_tensors():
    glob = nt(w=np.zeros(2, np.float32), n=np.array(5, np.int64))
    upd = Update("a", nt(w=np.array([3.0, 4.0], np.float32), n=np.array(9, np.int64)), 1)
    out = clip_deltas(clip_norm=1.0).apply(None, upd, glob)[0]
    np.testing.assert_allclose(out.weights["w"], [0.6, 0.8], rtol=1e-6)
    assert int(out.weights["n"]) == 5


def test_uniform_mean_ignores_example_counts():
    agg = uniform_mean()
    acc = agg.begin(ZERO)
    for value, n in [(1.0, 1), (4.0, 1000)]:
        acc = agg.fold(acc, Update("x", nt(w=np.full(2, value, np.float32), b=np.full(1, value, np.float32)), n))
    mean, count, total = agg.result(acc)
    np.testing.assert_allclose(mean["w"], [2.5, 2.5])
    assert (count, total) == (2, 2)


def _noise_post(**kw):
    args = dict(noise_multiplier=2.0, clip_norm=0.5, sample_rate=0.1, delta=1e-5, seed=7)
    return gaussian_noise(**{**args, **kw})


def test_noise_std_is_z_clip_over_m_and_seeded_by_round():
    post = _noise_post()
    big = NamedTensors({"w": np.zeros(40_000, np.float32)})
    state = post.init(big)
    out, state = post.apply(state, big, big, RoundInfo(round=3, num_updates=4, total_weight=4))
    std = 2.0 * 0.5 / 4  # z * S / m = 0.25
    assert np.std(out["w"]) == pytest.approx(std, rel=0.02)
    expected = round_rng(7, 3, dp._NOISE_SALT).normal(0.0, std, 40_000).astype(np.float32)
    np.testing.assert_array_equal(out["w"], expected)
    again, _ = post.apply(post.init(big), big, big, RoundInfo(round=3, num_updates=4, total_weight=4))
    other, _ = post.apply(post.init(big), big, big, RoundInfo(round=4, num_updates=4, total_weight=4))
    np.testing.assert_array_equal(out["w"], again["w"])
    assert not np.array_equal(out["w"], other["w"])


def test_epsilon_is_reported_after_each_round():
    post = _noise_post()
    state = post.init(ZERO)
    for rnd in (1, 2, 3):
        _, state = post.apply(state, ZERO, ZERO, RoundInfo(rnd, 5, 5))
    want = RdpAccountant().step(noise_multiplier=2.0, sample_rate=0.1, steps=3).epsilon(1e-5)
    metrics = post.metrics(state)
    assert metrics["dp_epsilon"] == pytest.approx(want, rel=1e-12)
    assert metrics["dp_clip_norm"] == 0.5 and state["rounds"] == 3


def test_adaptive_clip_follows_the_noisy_unclipped_count():
    post = _noise_post(noise_multiplier=1.0, adaptive=AdaptiveClip(target_quantile=0.5, learning_rate=0.2,
                                                                        count_stddev=1.0))
    # the update's share of the budget: (1 - 1/(2*1)^2)^(-1/2)
    assert post.update_noise_multiplier == pytest.approx(1 / math.sqrt(0.75))
    state = post.init(ZERO)
    norms = [0.1, 0.3, 2.0, 0.4]  # clip 0.5: three unclipped
    for i, norm in enumerate(norms):
        upd = Update(str(i), nt(w=np.array([norm, 0.0], np.float32), b=np.zeros(1, np.float32)), 1)
        clipped, state = post.preprocess(state, upd, ZERO)
        assert clipped.weights["w"][0] == pytest.approx(min(norm, 0.5))
    _, state = post.apply(state, ZERO, ZERO, RoundInfo(round=2, num_updates=4, total_weight=4))
    fraction = (3 + round_rng(7, 2, dp._COUNT_SALT).normal(0.0, 1.0)) / 4
    assert state["unclipped_fraction"] == pytest.approx(fraction)
    assert state["clip_norm"] == pytest.approx(0.5 * math.exp(-0.2 * (fraction - 0.5)))
    assert (state["seen"], state["unclipped"]) == (0, 0)


def test_adaptive_clip_refuses_updates_it_did_not_clip():
    post = _noise_post(noise_multiplier=1.0, adaptive=AdaptiveClip(count_stddev=1.0))
    with pytest.raises(RuntimeError, match="preprocess hook"):
        post.apply(post.init(ZERO), ZERO, ZERO, RoundInfo(1, 3, 3))


class _Shift:
    """Returns the received weights plus a fixed shift."""

    def __init__(self, shift: float):
        self.shift = shift

    def fit(self, weights, config):
        return NamedTensors({k: v + np.float32(self.shift) for k, v in weights.items()}), 10, {}

    def evaluate(self, weights, config):
        return 1, {}


def _run(seed: int, rounds: int = 2):
    trainers = {f"n{i}": _Shift(s) for i, s in enumerate([0.1, 5.0, -3.0, 0.2])}
    strategy = dp_fedavg(noise_multiplier=1.0, clip_norm=1.0, clients_per_round=4, total_clients=40, seed=seed)
    driver = Driver(InProcessFleet(trainers), strategy, ZERO, RunConfig(rounds=rounds, seed=seed))
    return driver.run()


def test_dp_fedavg_in_the_driver_reports_epsilon_and_is_deterministic():
    first, second, other = _run(1), _run(1), _run(2)
    assert first.weights.equal(second.weights) and not first.weights.equal(other.weights)
    want = RdpAccountant().step(noise_multiplier=1.0, sample_rate=0.1, steps=2).epsilon(1e-5)
    assert first.metric("dp_epsilon")[-1] == pytest.approx(want)
    assert first.metric("dp_epsilon")[0] < first.metric("dp_epsilon")[1]


def test_dp_fedavg_rejects_impossible_configurations():
    with pytest.raises(ValueError):
        dp_fedavg(noise_multiplier=1.0, clip_norm=1.0, clients_per_round=50, total_clients=10)
    with pytest.raises(ValueError, match="count_stddev"):
        dp_fedavg(noise_multiplier=1.0, clip_norm=1.0, clients_per_round=5, total_clients=10, adaptive=AdaptiveClip())
