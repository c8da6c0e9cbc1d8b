"""Simulation: many virtual clients on one machine or a Ray cluster.

``simulate`` runs the same Driver and strategies as a deployment over a
``RayFleet`` (or the in-process fleet). Ray is imported only when a Ray fleet
is made, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

from fedloom.simulations.simulate import make_fleet, simulate

__all__ = ["RayFleet", "make_fleet", "simulate"]


def __getattr__(name: str) -> Any:
    if name == "RayFleet":
        from fedloom.simulations.ray_fleet import RayFleet

        return RayFleet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
