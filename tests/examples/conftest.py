"""Examples are scripts, not a package: load one as a module by its file name."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def load_example() -> Iterator[Callable[[str], ModuleType]]:
    """``load_example("byzantine")`` runs ``examples/byzantine.py`` as a module (registered in
    ``sys.modules`` while the session lasts, as dataclasses look their module up there)."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        module_name = f"fedloom_example_{name}"
        if module_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            loaded.append(module_name)
        return sys.modules[module_name]

    yield load
    for module_name in loaded:
        sys.modules.pop(module_name, None)
