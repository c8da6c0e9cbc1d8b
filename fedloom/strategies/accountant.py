"""Rényi-DP accounting for the (Poisson-)subsampled Gaussian mechanism.

The RDP of one step follows Mironov, Talwar and Zhang (2019), "Rényi
Differential Privacy of the Sampled Gaussian Mechanism": integer orders by the
binomial expansion of A_alpha = E_{z~N(0,s^2)}[((1-q) + q e^{(2z-1)/(2s^2)})^alpha],
fractional orders by the two convergent series on either side of the point z0
where both mixture components are equal. RDP adds up over steps; the (epsilon,
delta) conversion is the tighter one of Balle et al. (2020) / Canonne, Kamath
and Steinke (2020), minimised over a fixed set of orders.

The accountant is a frozen value: ``step`` returns a new accountant, so it can
live in a strategy's explicit state and be checkpointed as plain numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import special

# Fine fractional orders near 1 (small epsilons), integers up to 63, a few large ones (large epsilons).
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]
)

_FRAC_MAX_TERMS = 1_000_000
_FRAC_BLOCK = 1024
_FRAC_REL_TOL = math.log(1e-14)


def _logsumexp_signed(pos: float, neg: float) -> float:
    """log(exp(pos) - exp(neg)) for pos >= neg."""
    if neg == -math.inf:
        return pos
    return pos + math.log1p(-math.exp(neg - pos))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha: a sum of positive binomial terms."""
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    return float(special.logsumexp(terms))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha: the two binomial series split at z0.

    Below z0, q*ratio < 1-q and ((1-q) + q*ratio)^alpha expands in powers of
    the ratio; above z0 it expands the other way. Each term is a Gaussian
    moment restricted to a half line, i.e. an exponential times an erfc.
    Terms are summed in blocks, positive and negative ones apart, in log space.
    """
    s2 = sigma**2
    z0 = s2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q = math.log(q), math.log1p(-q)
    pos, neg = -math.inf, -math.inf
    for start in range(0, _FRAC_MAX_TERMS, _FRAC_BLOCK):
        i = np.arange(start, start + _FRAC_BLOCK, dtype=np.float64)
        j = alpha - i
        # |C(alpha, i)|; its sign flips with each factor (alpha - k) < 0, i.e. for k > floor(alpha)
        log_coef = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(j + 1)
        negative = np.maximum(0, i - math.floor(alpha) - 1) % 2 == 1
        below = i * log_q + j * log_1q + (i * i - i) / (2 * s2) + special.log_ndtr((z0 - i) / sigma)
        above = j * log_q + i * log_1q + (j * j - j) / (2 * s2) + special.log_ndtr((j - z0) / sigma)
        terms = log_coef + np.logaddexp(below, above)
        pos = float(np.logaddexp(pos, special.logsumexp(terms[~negative]) if (~negative).any() else -math.inf))
        neg = float(np.logaddexp(neg, special.logsumexp(terms[negative]) if negative.any() else -math.inf))
        # Past alpha the terms alternate in sign and shrink: stop once negligible.
        if start > alpha + 1 and terms[-1] < pos + _FRAC_REL_TOL:
            break
    return _logsumexp_signed(pos, neg)


def rdp_sampled_gaussian(*, noise_multiplier: float, sample_rate: float, order: float) -> float:
    """RDP at ``order`` of one step of the Poisson-subsampled Gaussian mechanism."""
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier}")
    if order <= 1:
        raise ValueError(f"RDP orders must be greater than 1, got {order}")
    if sample_rate == 0:
        return 0.0
    if noise_multiplier == 0 or math.isinf(order):
        return math.inf
    if sample_rate == 1:
        return order / (2 * noise_multiplier**2)
    if float(order).is_integer():
        log_a = _log_a_int(sample_rate, noise_multiplier, int(order))
    else:
        log_a = _log_a_frac(sample_rate, noise_multiplier, order)
    return log_a / (order - 1)


@functools.lru_cache(maxsize=64)
def _rdp_vector(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(rdp_sampled_gaussian(noise_multiplier=noise_multiplier, sample_rate=sample_rate, order=a)
                 for a in orders)


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, best order) from RDP values, by Balle et al. 2020 Thm 21 / Canonne et al. 2020 Prop 12:

    epsilon = rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1),

    minimised over the orders. When total variation is already below delta
    (Bretagnolle-Huber: TV <= sqrt(1 - exp(-KL)) and KL <= RDP) epsilon is 0.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if len(orders) != len(rdp):
        raise ValueError(f"{len(orders)} orders but {len(rdp)} RDP values")
    best, best_order = math.inf, math.nan
    for a, r in zip(orders, rdp, strict=True):
        if math.isinf(r):
            eps = math.inf
        elif delta**2 + math.expm1(-max(r, 0.0)) > 0:
            eps = 0.0
        else:
            eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best:
            best, best_order = eps, a
    return max(0.0, best), best_order


@dataclass(frozen=True)
class RdpAccountant:
    """Accumulated RDP over a fixed set of orders; a value, not a mutable object.

    >>> acc = RdpAccountant().step(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    >>> round(acc.epsilon(1e-5), 2)  # doctest: +SKIP
    """

    orders: tuple[float, ...] = DEFAULT_ORDERS
    rdp: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        orders = tuple(float(a) for a in self.orders)
        if any(a <= 1 for a in orders):
            raise ValueError("RDP orders must be greater than 1")
        object.__setattr__(self, "orders", orders)
        rdp = tuple(float(r) for r in self.rdp) if self.rdp else (0.0,) * len(orders)
        if len(rdp) != len(orders):
            raise ValueError(f"{len(orders)} orders but {len(rdp)} RDP values")
        object.__setattr__(self, "rdp", rdp)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> RdpAccountant:
        """The accountant after ``steps`` more applications of the sampled Gaussian mechanism."""
        if steps < 0:
            raise ValueError(f"steps must be non-negative, got {steps}")
        one = _rdp_vector(float(noise_multiplier), float(sample_rate), self.orders)
        return RdpAccountant(self.orders, tuple(r + steps * s for r, s in zip(self.rdp, one, strict=True)))

    def epsilon(self, delta: float) -> float:
        """The smallest epsilon over the orders for which the steps so far are (epsilon, delta)-DP."""
        return epsilon_from_rdp(self.orders, self.rdp, delta)[0]
