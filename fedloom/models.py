"""Small reference models for the embedded workloads."""

from __future__ import annotations

from torch import nn


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for 1 x 8 x 8 digit images (about 12k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def mlp(in_features: int, num_classes: int, hidden: int = 64) -> nn.Module:
    """A one-hidden-layer perceptron for tabular and synthetic data."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def logreg(in_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer (its softmax is in the cross-entropy loss)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


# -------------------------------------------------- for FedBN (fedloom.transfer.FEDBN_PATTERNS)


def digits_cnn_bn(num_classes: int = 10) -> nn.Module:
    """``digits_cnn`` with BatchNorm after each convolution, its layers named (``bn1.weight``...) so
    ``FEDBN_PATTERNS`` find the normalization layers. No BatchNorm1d: a last batch of one row must train."""
    from collections import OrderedDict

    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("bn1", nn.BatchNorm2d(16)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("bn2", nn.BatchNorm2d(32)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(32 * 2 * 2, 64)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(64, num_classes)),
    ]))
