"""Data that needs no download: scikit-learn's embedded sets, generated data, user files.

Every loader returns a ``Dataset`` of numpy arrays (features float32, labels
int64); nothing is fetched at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"dataset has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.num_classes)


def split(data: Dataset, *, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded, stratified train/test split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(data.y):
        members = rng.permutation(np.flatnonzero(data.y == label))
        test_idx.append(members[: int(round(len(members) * test_fraction))])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(data)), test)
    return data.subset(train), data.subset(test)


def digits() -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), shaped N x 1 x 8 x 8."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return Dataset(x, raw.target.astype(np.int64), 10)


def synthetic(*, alpha: float, beta: float, num_clients: int, seed: int,
              dim: int = 60, num_classes: int = 10, mean_samples: float = 4.0) -> list[Dataset]:
    """Synthetic(alpha, beta) of the FedProx paper (Li et al., MLSys 2020), one data set per client.

    Client k has its own softmax model W_k, b_k ~ N(u_k, 1) with u_k ~ N(0, alpha),
    and features x ~ N(v_k, Sigma) with v_k ~ N(B_k, 1), B_k ~ N(0, beta) and
    Sigma diagonal with Sigma_jj = j^-1.2; sizes follow a lognormal power law.
    """
    rng = np.random.default_rng(seed)
    sizes = (rng.lognormal(mean_samples, 2.0, num_clients).astype(int) + 50)
    cov_diag = np.arange(1, dim + 1, dtype=np.float64) ** -1.2
    clients = []
    for k in range(num_clients):
        u = rng.normal(0.0, np.sqrt(alpha))
        w = rng.normal(u, 1.0, (dim, num_classes))
        b = rng.normal(u, 1.0, num_classes)
        big_b = rng.normal(0.0, np.sqrt(beta))
        v = rng.normal(big_b, 1.0, dim)
        x = rng.normal(v, np.sqrt(cov_diag), (sizes[k], dim))
        y = np.argmax(x @ w + b, axis=1)
        clients.append(Dataset(x.astype(np.float32), y.astype(np.int64), num_classes))
    return clients


def from_npz(path: str | Path, *, x_key: str = "x", y_key: str = "y") -> Dataset:
    """A data set from an ``.npz`` file with arrays ``x`` and ``y`` (never unpickled)."""
    with np.load(Path(path), allow_pickle=False) as f:
        missing = [k for k in (x_key, y_key) if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; found {f.files}")
        x, y = f[x_key], f[y_key]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be a 1-D integer array, got {y.dtype}{list(y.shape)}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative class indices, got {int(y.min())}")
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    return Dataset(x.astype(np.float32, copy=False), y.astype(np.int64), int(y.max()) + 1 if len(y) else 0)


LOADERS = {"digits": digits}
