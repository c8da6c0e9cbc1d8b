"""Streaming aggregation: folding uploads tensor by tensor, as a transport decodes them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedloom.strategies import fedavg, presets
from fedloom.strategies.asynchronous import fedbuff
from fedloom.strategies.dp import dp_fedavg
from fedloom.strategies.fedprox import fedprox
from fedloom.strategies.pipeline import Rejected, Update
from fedloom.strategies.scaffold import scaffold
from fedloom.strategies.streaming import StreamingFold, streamable
from fedloom.tensors import NamedTensors

GLOBAL = NamedTensors({"w": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float64), "n": np.zeros(2, np.int64)})


def _update(seed: int) -> NamedTensors:
    rng = np.random.default_rng(seed)
    return GLOBAL.map(lambda a: (rng.normal(size=a.shape) * 10).astype(a.dtype))


def _pieces(array: np.ndarray, size: int) -> list[np.ndarray]:
    flat = array.reshape(-1)
    return [flat[i : i + size] for i in range(0, flat.size, size)]


@pytest.mark.parametrize("precision", ["float64", "native"])
def test_streamed_folds_give_the_same_bits_as_whole_updates(precision) -> None:
    strategy = fedavg(precision=precision)
    updates = {f"n{i}": (_update(i), 3 + i) for i in range(3)}
    acc = strategy.aggregate.begin(GLOBAL)
    for node_id, (weights, n) in updates.items():
        acc = strategy.aggregate.fold(acc, Update(node_id, weights, n))
    expected, count, total = strategy.aggregate.result(acc)

    stream = StreamingFold(strategy, strategy.aggregate.begin(GLOBAL))
    for node_id, (weights, n) in updates.items():
        upload = stream.open(node_id, n)
        for name in reversed(list(weights)):  # tensors in any order, in pieces of any size
            upload.add(name, _pieces(weights[name], 5))
        stream.commit(node_id, n)
    got, got_count, got_total = strategy.aggregate.take(stream.close())
    assert (got_count, got_total) == (count, total) == (3, 12)
    assert list(got) == list(GLOBAL)
    for name in GLOBAL:
        assert got[name].dtype == GLOBAL[name].dtype and got[name].tobytes() == expected[name].tobytes()


def test_a_refused_or_broken_upload_leaves_only_whole_tensors_and_is_named() -> None:
    strategy = fedavg()
    stream = StreamingFold(strategy, strategy.aggregate.begin(GLOBAL))
    good = GLOBAL.map(lambda a: np.ones_like(a))
    upload = stream.open("good", 1)
    for name, array in good.items():
        upload.add(name, [array.reshape(-1)])
    stream.commit("good", 1)
    bad = stream.open("bad", 3)
    bad.add("w", [np.full(12, 5, np.float32)])  # folded before the stream breaks
    with pytest.raises(Rejected, match="non-finite values in b"):
        bad.add("b", [np.array([1, 2, np.nan, 4, 5])])
    with pytest.raises(Rejected, match="unexpected tensor"):
        bad.add("evil", [np.zeros(1)])
    with pytest.raises(RuntimeError, match="no complete"):
        stream.commit("bad", 3)
    acc = stream.close()
    assert stream.partial() == {"bad": 1}
    mean, count, total = strategy.aggregate.result(acc)
    assert (count, total) == (1, 1)
    np.testing.assert_array_equal(mean["w"], np.full((3, 4), (1 * 1 + 5 * 3) / 4, np.float32))  # both copies
    np.testing.assert_array_equal(mean["b"], np.ones(5))  # only the good copy
    with pytest.raises(Rejected, match="round is over"):
        upload.add("w", [np.zeros(12, np.float32)])


def test_open_refuses_bad_counts_repeats_and_a_closed_round() -> None:
    stream = StreamingFold(fedavg(), fedavg().aggregate.begin(GLOBAL))
    with pytest.raises(Rejected, match="num_examples must be positive"):
        stream.open("a", 0)
    stream.open("a", 1)
    with pytest.raises(Rejected, match="already uploaded"):
        stream.open("a", 1)
    stream.close()
    with pytest.raises(Rejected, match="round is over"):
        stream.open("b", 1)


def test_concurrent_uploads_fold_every_tensor_exactly_once() -> None:
    strategy = fedavg()
    big = NamedTensors({f"t{i}": np.zeros(50_000) for i in range(6)})
    stream = StreamingFold(strategy, strategy.aggregate.begin(big))

    def upload(node: int) -> None:
        up = stream.open(f"n{node}", 1)
        for name, array in big.items():
            up.add(name, _pieces(array + node, 7_000))
        stream.commit(f"n{node}", 1)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mean, count, _ = strategy.aggregate.result(stream.close())
    assert count == 8 and all((a == 3.5).all() for a in mean.values())


def test_only_strategies_whose_work_is_per_tensor_stream() -> None:
    assert streamable(fedavg()) and streamable(presets.fedavgm()) and streamable(presets.fedadam())
    assert streamable(fedprox(mu=0.1))  # its proximal term is the clients' business
    assert not streamable(presets.fedmedian()) and not streamable(presets.krum())
    assert not streamable(dp_fedavg(noise_multiplier=1.0, clip_norm=1.0, clients_per_round=2, total_clients=4))
    assert not streamable(fedbuff()) and not streamable(scaffold())
