"""FedProx (Li et al., MLSys 2020): FedAvg whose clients add a proximal term to their loss."""

from __future__ import annotations

from fedloom.strategies.pipeline import Strategy, check_finite, check_structure, weighted_mean


def fedprox(*, mu: float, precision: str = "float64") -> Strategy:
    """FedAvg aggregation; clients minimise loss + (mu/2) * ||w - w_global||^2 (``mu`` in the fit config).

    FedProx also keeps the partial work of clients that did fewer local epochs;
    that is the fleet's and trainer's business, not the aggregation's.
    """
    if mu < 0:
        raise ValueError(f"mu must be non-negative, got {mu}")
    return Strategy(
        name="fedprox",
        pre=(check_structure(), check_finite()),
        aggregate=weighted_mean(precision=precision),
        fit_config={"mu": float(mu)},
    )
