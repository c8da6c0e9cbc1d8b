"""Strategies by name, with their hyperparameters from strings (CLI) or TOML values.

``build("fedprox", {"mu": "0.1"})`` calls the preset ``fedprox(mu=0.1)``,
converting each value to the type of the parameter's default and refusing
unknown names with the list of valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fedloom.strategies.pipeline import Strategy


def available() -> dict[str, Callable[..., Strategy]]:
    """Every preset selectable by name."""
    from fedloom.server.secure import secagg_fedavg
    from fedloom.strategies import asynchronous, dp, fedprox, presets, scaffold

    found: dict[str, Callable[..., Strategy]] = {
        **presets.PRESETS, "scaffold": scaffold.scaffold, "fedbuff": asynchronous.fedbuff,
        "fedprox": fedprox.fedprox, "dp_fedavg": dp.dp_fedavg, "dp_fedavg_adaptive": dp.dp_fedavg_adaptive,
        "secagg_fedavg": secagg_fedavg,
    }
    return dict(sorted(found.items()))


def parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of a preset and their defaults."""
    factory = _factory(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _factory(name: str) -> Callable[..., Strategy]:
    presets = available()
    if name not in presets:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(presets)}")
    return presets[name]


def _describe(key: str, default: Any) -> str:
    return f"{key} (required)" if default is inspect.Parameter.empty else f"{key}={default!r}"


def describe(name: str) -> str:
    """``name(param=default, ...)`` for help texts."""
    return f"{name}({', '.join(_describe(k, v) for k, v in parameters(name).items())})"


def parse_params(pairs: list[str]) -> dict[str, str]:
    """``["mu=0.1", "beta=0.2"]`` -> ``{"mu": "0.1", "beta": "0.2"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"strategy parameter {pair!r} must look like NAME=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _guess(value: str) -> Any:
    """A value for a parameter without a default: bool, int, float, or the string itself."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _convert(name: str, key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if default is inspect.Parameter.empty or default is None:
        return _guess(value)
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ValueError(f"{name}: {key}={value!r} is not a valid {type(default).__name__}") from None
    return value


def build(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """The preset ``name`` called with ``params`` (strings are converted by the defaults' types)."""
    factory = _factory(name)
    known = parameters(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(known))
    if unknown:
        valid = ", ".join(_describe(k, v) for k, v in known.items()) or "none"
        raise ValueError(f"strategy {name!r} has no parameter {', '.join(unknown)}; valid: {valid}")
    kwargs = {k: _convert(name, k, v, known[k]) for k, v in params.items()}
    missing = [k for k, v in known.items() if v is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"strategy {name!r} needs {', '.join(missing)}; e.g. --param {missing[0]}=VALUE")
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"strategy {name!r}: {exc}") from None


def with_norm_check(strategy: Strategy, *, z_threshold: float) -> Strategy:
    """``strategy`` that also rejects updates whose norm is an outlier (robust z-score above ``z_threshold``)."""
    import dataclasses

    from fedloom.strategies.validation import check_norm_outliers

    return dataclasses.replace(strategy, pre=(*strategy.pre, check_norm_outliers(z_threshold=z_threshold)))
