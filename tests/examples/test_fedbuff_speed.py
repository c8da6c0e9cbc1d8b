"""The FedBuff example runs and its asynchronous run matches the synchronous accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "fedbuff_speed.py"


def test_fedbuff_example_quick() -> None:
    spec = importlib.util.spec_from_file_location("fedbuff_speed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    assert result["sync_seconds"] is not None
    assert result["fedbuff_best"] >= result["target_accuracy"]
