
import pytest
import torch

from fedloom.transfer import load_pretrained


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("transfer_digits")


def test_quick_run_saves_the_backbone_and_sends_only_federated_bytes(example, tmp_path, capsys):
    torch.set_num_threads(1)
    results = example.main(["--quick", "--out-dir", str(tmp_path)])
    assert "frozen_backbone" in capsys.readouterr().out
    pretrained = load_pretrained(tmp_path / "pretrained_0-4.safetensors")
    assert list(pretrained)[:2] == ["0.weight", "0.bias"]
    # digits_cnn: conv 160 + conv 4,640 + dense 8,256 + dense 650 parameters, float32; the head-only run
    # sends the last layer only. Per round: 5 clients down + 5 up.
    for method, params in (("scratch", 13706), ("frozen_backbone", 8906), ("head_only", 650)):
        assert results[method]["federated_params"] == params
        assert results[method]["bytes"] == 2 * 2 * 5 * 4 * params
    assert results["pretrained"]["accuracy_0-4"] > 0.6
    # two short rounds are not enough from scratch; a pretrained backbone already separates 5-9 well
    assert results["frozen_backbone"]["accuracy"] > results["scratch"]["accuracy"] + 0.15
