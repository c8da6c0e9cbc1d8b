"""Seeded partitioners: how a data set is split across clients.

Each returns one sorted index array per client; every sample is assigned to
exactly one client.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(n_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if n_samples < num_clients:
        raise ValueError(f"cannot split {n_samples} samples across {num_clients} clients")


def iid(labels: np.ndarray, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Uniformly random, equal-sized parts."""
    _check(len(labels), num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, *, alpha: float, seed: int,
              min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label skew: each class is spread over clients by proportions ~ Dir(alpha).

    Small alpha gives clients few classes; large alpha tends to IID. Draws are
    repeated (seeded) until every client has at least ``min_size`` samples.
    """
    _check(len(labels), num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(members)).astype(int)[:-1]
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({alpha}) split gives each of {num_clients} clients {min_size} samples")


def shards(labels: np.ndarray, num_clients: int, *, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al.): sort by label, cut into shards, deal k per client."""
    _check(len(labels), num_clients * classes_per_client)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * classes_per_client)
    deal = rng.permutation(len(pieces)).reshape(num_clients, classes_per_client)
    return [np.sort(np.concatenate([pieces[i] for i in row])) for row in deal]


def quantity_skew(labels: np.ndarray, num_clients: int, *, exponent: float = 1.5, seed: int,
                  min_size: int = 1) -> list[np.ndarray]:
    """IID labels but power-law sizes: client k's share ~ Pareto-like weights."""
    _check(len(labels), num_clients * min_size)
    rng = np.random.default_rng(seed)
    weights = rng.pareto(exponent, num_clients) + 1e-3
    spare = len(labels) - num_clients * min_size
    sizes = min_size + np.floor(weights / weights.sum() * spare).astype(int)
    sizes[np.argmax(sizes)] += len(labels) - sizes.sum()
    perm = rng.permutation(len(labels))
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, seed: int,
              alpha: float = 0.5, classes_per_client: int = 2, exponent: float = 1.5) -> list[np.ndarray]:
    """Dispatch by name: ``iid``, ``dirichlet``, ``shards``, ``quantity``."""
    if scheme == "iid":
        return iid(labels, num_clients, seed=seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha=alpha, seed=seed)
    if scheme == "shards":
        return shards(labels, num_clients, classes_per_client=classes_per_client, seed=seed)
    if scheme == "quantity":
        return quantity_skew(labels, num_clients, exponent=exponent, seed=seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose iid, dirichlet, shards or quantity")


SCHEMES = ("iid", "dirichlet", "shards", "quantity")


def stats(labels: np.ndarray, parts: Sequence[np.ndarray]) -> dict[str, tuple[float, float, float]]:
    """(min, median, max) of samples and of distinct classes per client."""
    sizes = np.array([len(p) for p in parts])
    classes = np.array([len(np.unique(labels[p])) for p in parts])
    return {
        "samples": (float(sizes.min()), float(np.median(sizes)), float(sizes.max())),
        "classes": (float(classes.min()), float(np.median(classes)), float(classes.max())),
    }
