"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) and chain_post, against hand-computed steps."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest

from fedloom.strategies import RoundInfo
from fedloom.strategies.server_opt import adagrad, adam, chain_post, server_momentum, yogi
from fedloom.tensors import NamedTensors

INFO = RoundInfo(round=1, num_updates=2, total_weight=10.0)


def _nt(**arrays) -> NamedTensors:
    return NamedTensors(arrays)


def _run(post, global_weights: NamedTensors, aggregates: list[float]) -> tuple[list[float], object]:
    """Feed scalar aggregates ``x`` (tensor "x") round after round; the global follows the post's output."""
    state = post.init(global_weights)
    outs = []
    for value in aggregates:
        agg = _nt(x=np.array([value], global_weights["x"].dtype), n=np.array([7], np.int64))
        global_weights, state = post.apply(state, global_weights, agg, INFO)
        outs.append(float(global_weights["x"][0]))
        assert global_weights["n"].tolist() == [7]  # integer tensors pass through from the aggregate
    return outs, state


def _g(x: float = 0.0, dtype=np.float64) -> NamedTensors:
    return _nt(x=np.array([x], dtype), n=np.array([3], np.int64))


def test_server_momentum_two_rounds():
    # r1: delta = 2 - 1 = 1; v = 1; x = 1 + 0.5*1 = 1.5
    # r2: delta = 1.5 - 1.5 = 0; v = 0.9*1 + 0 = 0.9; x = 1.5 + 0.5*0.9 = 1.95
    outs, state = _run(server_momentum(lr=0.5, momentum=0.9), _g(1.0), [2.0, 1.5])
    assert outs == pytest.approx([1.5, 1.95], abs=1e-12)
    assert state["velocity"]["x"].tolist() == pytest.approx([0.9])


def test_server_momentum_lr1_no_momentum_is_the_aggregate():
    outs, _ = _run(server_momentum(lr=1.0, momentum=0.0), _g(0.25), [0.75, -1.5])
    assert outs == [0.75, -1.5]


# beta1 = 0.9, beta2 = 0.75, tau = 0, lr = 0.1; r1: global 0, aggregate 2 (delta 2);
# r2: delta -2 (aggregate = new global - 2).
# r1 (adam and yogi): m = 0.1*2 = 0.2; adam v = 0.25*4 = 1; yogi v = 0 - 0.25*4*sign(0-4) = 1;
#     x = 0 + 0.1*0.2/1 = 0.02
# r2: m = 0.9*0.2 + 0.1*(-2) = -0.02
#     adam v = 0.75*1 + 0.25*4 = 1.75 -> x = 0.02 - 0.002/sqrt(1.75) = 0.02 - 0.00151185789 = 0.01848814211
#     yogi v = 1 - 0.25*4*sign(1-4) = 2   -> x = 0.02 - 0.002/sqrt(2)    = 0.02 - 0.00141421356 = 0.01858578644
@pytest.mark.parametrize(
    ("factory", "expected"),
    [(adam, [0.02, 0.01848814211]), (yogi, [0.02, 0.01858578644])],
    ids=["adam", "yogi"],
)
def test_adam_and_yogi_two_rounds(factory, expected):
    post = factory(lr=0.1, beta1=0.9, beta2=0.75, tau=0.0)
    state = post.init(_g())
    g1, state = post.apply(state, _g(), _g(2.0), INFO)
    g2, state = post.apply(state, g1, _g(float(g1["x"][0]) - 2.0), INFO)
    assert [g1["x"][0], g2["x"][0]] == pytest.approx(expected, abs=1e-10)
    assert state["step"] == 2
    assert state["m"]["x"].tolist() == pytest.approx([-0.02])


def test_adagrad_two_rounds():
    # beta1 = 0 (default): m = delta. r1: delta 2, v = 4, x = 0 + 0.1*2/2 = 0.1
    # r2: delta -2, v = 8, x = 0.1 - 0.1*2/sqrt(8) = 0.1 - 0.07071067812 = 0.02928932188
    post = adagrad(lr=0.1, tau=0.0)
    state = post.init(_g())
    g1, state = post.apply(state, _g(), _g(2.0), INFO)
    g2, state = post.apply(state, g1, _g(0.1 - 2.0), INFO)
    assert [g1["x"][0], g2["x"][0]] == pytest.approx([0.1, 0.02928932188], abs=1e-10)
    assert state["v"]["x"].tolist() == pytest.approx([8.0])


def test_tau_and_initial_accumulator_enter_the_denominator():
    # adagrad, v0 = 5, tau = 1: delta 2 -> v = 9, x = 0.1*2/(3 + 1) = 0.05
    post = adagrad(lr=0.1, tau=1.0, initial_accumulator=5.0)
    out, _ = post.apply(post.init(_g()), _g(), _g(2.0), INFO)
    assert out["x"][0] == pytest.approx(0.05, abs=1e-12)


def test_adam_bias_correction_first_step_is_lr():
    # t = 1: lr_t = 0.1*sqrt(1-0.75)/(1-0.9) = 0.5; m = 0.2, v = 1 -> x = 0.5*0.2/1 = 0.1
    post = adam(lr=0.1, beta1=0.9, beta2=0.75, tau=0.0, bias_correction=True)
    out, state = post.apply(post.init(_g()), _g(), _g(2.0), INFO)
    assert out["x"][0] == pytest.approx(0.1, abs=1e-12)
    assert state["step"] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_narrow_floats_keep_float32_state_and_their_dtype(dtype):
    post = server_momentum(lr=0.5, momentum=0.9)
    g = _g(1.0, dtype)
    state = post.init(g)
    out, state = post.apply(state, g, _g(3.0, dtype), INFO)
    # delta 2, v = 2, x = 1 + 0.5*2 = 2 (exact in every dtype)
    assert out["x"].dtype == np.dtype(dtype) and float(out["x"][0]) == 2.0
    assert state["velocity"]["x"].dtype == np.float32
    assert "n" not in state["velocity"]


@pytest.mark.parametrize("factory", [server_momentum, adam, yogi, adagrad])
def test_state_is_plain_and_apply_does_not_mutate_it(factory):
    post = factory()
    g = _nt(w=np.arange(4, dtype=np.float32).reshape(2, 2), n=np.array(3, np.int64))
    state = post.init(g)
    agg = _nt(w=np.full((2, 2), 5.0, np.float32), n=np.array(4, np.int64))
    _, state = post.apply(state, g, agg, INFO)
    before = copy.deepcopy(state)
    post.apply(state, g, agg, INFO)
    for key, value in before.items():
        if isinstance(value, dict):
            assert all(isinstance(a, np.ndarray) for a in state[key].values())
            assert all(np.array_equal(a, state[key][n]) for n, a in value.items())
        else:
            assert isinstance(value, int) and value == state[key]


def test_chain_post_equals_applying_the_pieces_by_hand():
    pieces = (server_momentum(lr=0.5, momentum=0.5), adam(lr=0.05, beta2=0.9))
    chained = chain_post(*pieces)
    rng = np.random.default_rng(0)
    g = _nt(w=rng.normal(size=(3, 2)).astype(np.float32), n=np.array([1, 2], np.int64))
    state, by_hand = chained.init(g), [p.init(g) for p in pieces]
    g_hand = g
    for _ in range(3):
        agg = _nt(w=(g["w"] + rng.normal(size=(3, 2))).astype(np.float32), n=np.array([1, 3], np.int64))
        g, state = chained.apply(state, g, agg, INFO)
        step = agg
        for i, piece in enumerate(pieces):
            step, by_hand[i] = piece.apply(by_hand[i], g_hand, step, INFO)
        g_hand = step
        assert g.equal(g_hand)
    assert state[1]["step"] == by_hand[1]["step"] == 3
    assert np.array_equal(state[0]["velocity"]["w"], by_hand[0]["velocity"]["w"])


def test_chain_post_of_nothing_is_identity():
    post = chain_post()
    g, agg = _g(1.0), _g(2.0)
    out, state = post.apply(post.init(g), g, agg, INFO)
    assert out is agg and state == []


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        (server_momentum, {"lr": 0.0}),
        (server_momentum, {"momentum": 1.0}),
        (adam, {"beta1": -0.1}),
        (adam, {"beta2": 1.0}),
        (yogi, {"tau": -1e-3}),
        (adagrad, {"initial_accumulator": -1.0}),
    ],
)
def test_invalid_hyperparameters_are_refused(factory, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        factory(**kwargs)
