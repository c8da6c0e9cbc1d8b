"""Ready-made strategies, each a few lines built from the public pieces.

Hyperparameter defaults follow Flower's strategies of the same name, except
where docs/robust.md says otherwise (FedAvgM's momentum, Krum's mean).
"""

from __future__ import annotations

from fedloom.strategies import robust, server_opt
from fedloom.strategies.pipeline import Strategy, check_finite, check_structure, weighted_mean


def fedavg(*, precision: str = "float64") -> Strategy:
    """FedAvg (McMahan et al. 2017): the example-weighted mean of client weights."""
    return Strategy(
        name="fedavg",
        pre=(check_structure(), check_finite()),
        aggregate=weighted_mean(precision=precision),
    )


def fedavgm(*, server_lr: float = 1.0, server_momentum: float = 0.9) -> Strategy:
    """FedAvgM (Hsu et al. 2019): FedAvg's mean, then a server SGD step with momentum."""
    return Strategy(
        name="fedavgm",
        pre=(check_structure(), check_finite()),
        aggregate=weighted_mean(),
        post=server_opt.server_momentum(lr=server_lr, momentum=server_momentum),
    )


def fedadam(*, eta: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-9,
            bias_correction: bool = False) -> Strategy:
    """FedAdam (Reddi et al. 2021): FedAvg's mean, then a server Adam step on the pseudo-gradient."""
    return Strategy(
        name="fedadam",
        pre=(check_structure(), check_finite()),
        aggregate=weighted_mean(),
        post=server_opt.adam(lr=eta, beta1=beta1, beta2=beta2, tau=tau, bias_correction=bias_correction),
    )


def fedyogi(*, eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> Strategy:
    """FedYogi (Reddi et al. 2021): FedAvg's mean, then a server Yogi step."""
    return Strategy(
        name="fedyogi",
        pre=(check_structure(), check_finite()),
        aggregate=weighted_mean(),
        post=server_opt.yogi(lr=eta, beta1=beta1, beta2=beta2, tau=tau),
    )


def fedadagrad(*, eta: float = 0.1, beta1: float = 0.0, tau: float = 1e-9) -> Strategy:
    """FedAdagrad (Reddi et al. 2021): FedAvg's mean, then a server Adagrad step."""
    return Strategy(
        name="fedadagrad",
        pre=(check_structure(), check_finite()),
        aggregate=weighted_mean(),
        post=server_opt.adagrad(lr=eta, beta1=beta1, tau=tau),
    )


def fedmedian() -> Strategy:
    """FedMedian (Yin et al. 2018): the coordinate-wise median of client weights."""
    return Strategy(name="fedmedian", pre=(check_structure(), check_finite()), aggregate=robust.median())


def fedtrimmedavg(*, beta: float = 0.2) -> Strategy:
    """FedTrimmedAvg (Yin et al. 2018): per coordinate, the mean without the beta-fraction tails."""
    return Strategy(
        name="fedtrimmedavg",
        pre=(check_structure(), check_finite()),
        aggregate=robust.trimmed_mean(beta=beta),
    )


def krum(*, num_malicious: int = 0) -> Strategy:
    """Krum (Blanchard et al. 2017): the one update closest to its n - f - 2 nearest neighbours."""
    return Strategy(
        name="krum",
        pre=(check_structure(), check_finite()),
        aggregate=robust.krum(num_malicious=num_malicious, num_selected=1),
    )


def multikrum(*, num_malicious: int = 0, num_selected: int | None = None, weighted: bool = False) -> Strategy:
    """Multi-Krum (Blanchard et al. 2017): the mean of the best Krum scores (``None``: n - f of them)."""
    return Strategy(
        name="multikrum",
        pre=(check_structure(), check_finite()),
        aggregate=robust.krum(num_malicious=num_malicious, num_selected=num_selected, weighted=weighted),
    )


def bulyan(*, num_malicious: int = 0) -> Strategy:
    """Bulyan (El Mhamdi et al. 2018): repeated Krum selection, then a mean around the median."""
    return Strategy(
        name="bulyan",
        pre=(check_structure(), check_finite()),
        aggregate=robust.bulyan(num_malicious=num_malicious),
    )


PRESETS = {
    "fedavg": fedavg,
    "fedavgm": fedavgm,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedadagrad": fedadagrad,
    "fedmedian": fedmedian,
    "fedtrimmedavg": fedtrimmedavg,
    "krum": krum,
    "multikrum": multikrum,
    "bulyan": bulyan,
}
