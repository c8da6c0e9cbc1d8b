"""The FedBuff example runs and its asynchronous run matches the synchronous accuracy."""

from __future__ import annotations


def test_fedbuff_example_quick(load_example) -> None:
    result = load_example("fedbuff_speed").main(["--quick"])
    assert result["sync_seconds"] is not None
    assert result["fedbuff_best"] >= result["target_accuracy"]
