import math

import mpmath
import numpy as np
import pytest

from fedloom.strategies.accountant import (
    DEFAULT_ORDERS,
    RdpAccountant,
    epsilon_from_rdp,
    rdp_sampled_gaussian,
)

INT_ORDERS = (*(float(a) for a in range(2, 64)), 128.0, 256.0, 512.0, 1024.0)

# (noise multiplier, sample rate, steps, delta, epsilon over INT_ORDERS from dp-accounting 0.6.0)
REFERENCE = [
    (1.0, 0.01, 1000, 1e-5, 2.1077530754515745),
    (1.1, 0.001, 10000, 1e-6, 0.7856438503871912),
    (0.8, 0.1, 100, 1e-5, 13.828010209476963),
    (2.0, 0.5, 50, 1e-5, 10.30285114792406),
    (5.0, 0.3, 1000, 1e-6, 11.316074508422847),
    (0.5, 0.02, 200, 1e-5, 14.369165492749534),
    (1.0, 0.9, 10, 1e-3, 14.241957746004767),
]


@pytest.mark.parametrize("z, q, steps, delta, expected", REFERENCE)
def test_epsilon_matches_recorded_dp_accounting(z, q, steps, delta, expected):
    acc = RdpAccountant(INT_ORDERS).step(noise_multiplier=z, sample_rate=q, steps=steps)
    assert acc.epsilon(delta) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("z, q, steps, delta", [r[:4] for r in REFERENCE[:4]])
def test_integer_orders_match_live_dp_accounting(z, q, steps, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    ref = dp_accounting.rdp.RdpAccountant(list(INT_ORDERS))
    ref.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    acc = RdpAccountant(INT_ORDERS).step(noise_multiplier=z, sample_rate=q, steps=steps)
    np.testing.assert_allclose(acc.rdp, ref._rdp, rtol=1e-10)
    assert acc.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


def _rdp_by_integration(q: float, sigma: float, alpha: float) -> float:
    """log E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2 s^2)))^alpha] / (alpha-1), by quadrature."""
    with mpmath.workdps(30):
        q, s, a = mpmath.mpf(q), mpmath.mpf(sigma), mpmath.mpf(alpha)

        def f(z):
            return mpmath.npdf(z, 0, s) * ((1 - q) + q * mpmath.exp((2 * z - 1) / (2 * s * s))) ** a

        total = mpmath.quad(f, [-mpmath.inf, -10 * s, 0, 1, 10 * s + a, mpmath.inf])
        return float(mpmath.log(total) / (a - 1))


@pytest.mark.parametrize("q, sigma, alpha", [(0.01, 1.0, 1.1), (0.3, 5.0, 1.5), (0.1, 0.8, 2.5), (0.05, 2.0, 7.0)])
def test_rdp_matches_numerical_integration(q, sigma, alpha):
    got = rdp_sampled_gaussian(noise_multiplier=sigma, sample_rate=q, order=alpha)
    assert got == pytest.approx(_rdp_by_integration(q, sigma, alpha), rel=1e-8)


@pytest.mark.parametrize("sigma, alpha", [(1.0, 2.0), (0.7, 1.5), (3.0, 32.0)])
def test_full_batch_is_the_gaussian_mechanism(sigma, alpha):
    assert rdp_sampled_gaussian(noise_multiplier=sigma, sample_rate=1.0, order=alpha) == alpha / (2 * sigma**2)
    near = rdp_sampled_gaussian(noise_multiplier=sigma, sample_rate=1 - 1e-9, order=alpha)
    assert near == pytest.approx(alpha / (2 * sigma**2), rel=1e-6)


@pytest.mark.parametrize("q, sigma", [(0.1, 1.0), (0.5, 2.0)])
def test_order_two_by_hand(q, sigma):
    # A_2 = (1-q)^2 + 2q(1-q) + q^2 e^{1/sigma^2} = 1 + q^2 (e^{1/sigma^2} - 1)
    expected = math.log(1 + q * q * (math.exp(1 / sigma**2) - 1))
    assert rdp_sampled_gaussian(noise_multiplier=sigma, sample_rate=q, order=2) == pytest.approx(expected, rel=1e-12)


def test_conversion_by_hand():
    # one order alpha=3, rdp 0.5: eps = 0.5 + log(2/3) - (log(1e-5) + log 3) / 2
    eps, order = epsilon_from_rdp([3.0], [0.5], 1e-5)
    assert order == 3.0
    assert eps == pytest.approx(0.5 + math.log(2 / 3) - (math.log(1e-5) + math.log(3)) / 2, rel=1e-12)


def test_steps_compose_additively_and_accountant_is_a_value():
    start = RdpAccountant((2.0, 1.5, 10.0))
    once = start.step(noise_multiplier=1.3, sample_rate=0.05)
    thrice = once.step(noise_multiplier=1.3, sample_rate=0.05).step(noise_multiplier=1.3, sample_rate=0.05)
    np.testing.assert_allclose(thrice.rdp, start.step(noise_multiplier=1.3, sample_rate=0.05, steps=3).rdp)
    np.testing.assert_allclose(thrice.rdp, [3 * r for r in once.rdp])
    assert start.rdp == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("z, q, expected", [(1.0, 0.0, 0.0), (0.0, 0.1, math.inf)])
def test_degenerate_mechanisms(z, q, expected):
    assert RdpAccountant().step(noise_multiplier=z, sample_rate=q, steps=5).epsilon(1e-5) == expected


def test_default_orders_are_no_looser_than_integer_orders():
    z, q, steps = 1.0, 0.01, 1000
    fine = RdpAccountant(DEFAULT_ORDERS).step(noise_multiplier=z, sample_rate=q, steps=steps).epsilon(1e-5)
    coarse = RdpAccountant(INT_ORDERS).step(noise_multiplier=z, sample_rate=q, steps=steps).epsilon(1e-5)
    assert fine < coarse


@pytest.mark.parametrize("kwargs", [{"noise_multiplier": 1.0, "sample_rate": 1.5},
                                    {"noise_multiplier": -1.0, "sample_rate": 0.1}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RdpAccountant().step(**kwargs)
