"""SecAgg / SecAgg+ rounds in memory: correctness under dropouts, aborts, the coordinator's view, tampering."""

from dataclasses import replace

import numpy as np
import pytest

from fedloom.secagg import (
    EncryptedShare,
    InsufficientParticipants,
    ProtocolViolation,
    RevealRefused,
    SecAggClient,
    SecAggCoordinator,
    UnmaskRequest,
    default_degree,
    error_bound,
    harary_graph,
    plan_round,
    quantize,
    run_secagg,
)
from fedloom.secagg.crypto import signing_public

LENGTH = 1000


def make_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"node-{i:02d}": rng.uniform(-1, 1, LENGTH) for i in range(n)}


def spread(ids: list[str], count: int) -> dict[int, set[str]]:
    """`count` dropouts dealt round-robin over stages 1..4."""
    out: dict[int, set[str]] = {1: set(), 2: set(), 3: set(), 4: set()}
    for i, node in enumerate(ids[:count]):
        out[1 + i % 4].add(node)
    return out


def check_sum(inputs: dict[str, np.ndarray], result, expected_survivors: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert set(result.survivors) == expected_survivors
    exact = sum(inputs[i] for i in expected_survivors)
    spec = result.setup.quant
    assert np.max(np.abs(result.total - exact)) <= error_bound(spec, len(expected_survivors))


@pytest.mark.parametrize("n", [5, 8, 13, 20])
def test_classic_sum_with_max_dropouts(n: int) -> None:
    inputs = make_inputs(n, seed=n)
    t = n // 2 + 1
    ids = sorted(inputs)[::-1]
    drops = spread(ids, n - t)
    result = run_secagg(inputs, threshold=t, dropouts_at_stage=drops, seed=n)
    # stage-4 dropouts sent their masked input, so their inputs are in the sum
    gone = drops[1] | drops[2] | drops[3]
    check_sum(inputs, result, set(inputs) - gone)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_classic_all_dropouts_at_one_stage(stage: int) -> None:
    inputs = make_inputs(7, seed=stage)
    drops = {stage: set(sorted(inputs)[:3])}
    result = run_secagg(inputs, threshold=4, dropouts_at_stage=drops, seed=stage)
    check_sum(inputs, result, set(inputs) - (drops[stage] if stage < 4 else set()))


@pytest.mark.parametrize("n", [10, 16, 20])
def test_secagg_plus_sparse_graph_with_dropouts(n: int) -> None:
    inputs = make_inputs(n, seed=100 + n)
    k = default_degree(n)
    assert k < n - 1
    t = k // 2 + 1
    drops = spread(sorted(inputs), k + 1 - t)  # a neighbourhood of k + 1 holders can lose k + 1 - t
    result = run_secagg(inputs, threshold=t, neighbours=k, dropouts_at_stage=drops, seed=n, signed=True)
    check_sum(inputs, result, set(inputs) - (drops[1] | drops[2] | drops[3]))


def test_no_dropouts_with_bits_16_and_extreme_values() -> None:
    inputs = {i: np.full(LENGTH, -1.0 if i % 2 else 1.0) for i in range(6)}
    inputs[0][:3] = [5.0, -5.0, 0.3]  # clipped to [-1, 1]; the others sum to 2 - 3 = -1
    result = run_secagg(inputs, threshold=4, bits=16, seed=3)
    expected = np.zeros(LENGTH)
    expected[:3] = [0.0, -2.0, 0.3 - 1.0]
    assert np.max(np.abs(result.total - expected)) <= error_bound(result.setup.quant, 6)


@pytest.mark.parametrize("stage, where", [(1, "advertise keys"), (2, "share keys"), (3, "masked input"), (4, "unmask")])
def test_below_threshold_aborts(stage: int, where: str) -> None:
    inputs = make_inputs(6)
    t = 4
    with pytest.raises(InsufficientParticipants, match=where) as err:
        run_secagg(inputs, threshold=t, dropouts_at_stage={stage: set(sorted(inputs)[: 6 - t + 1])})
    assert err.value.need == t and err.value.have < t


def test_secagg_plus_neighbourhood_below_threshold_aborts() -> None:
    n, k, t, seed = 12, 4, 3, 5
    inputs = make_inputs(n)
    ids = sorted(inputs)
    around_first = harary_graph(n, k, seed=seed)[0]  # neighbours of slot 1 (ids[0])
    drops = {4: {ids[v - 1] for v in around_first[: k + 1 - t + 1]}}  # slot 1 keeps t - 1 holders
    with pytest.raises(InsufficientParticipants, match="slot 1"):
        run_secagg(inputs, threshold=t, neighbours=k, dropouts_at_stage=drops, seed=seed)


def test_coordinator_view_is_masked_and_uniform() -> None:
    inputs = make_inputs(5)
    inputs["node-00"] = np.zeros(LENGTH)
    inputs["node-01"] = np.zeros(LENGTH)
    result = run_secagg(inputs, threshold=3, seed=1)
    spec = result.setup.quant
    for node, y in result.masked.items():
        q = quantize(inputs[node], spec)
        assert np.mean(y != q) > 0.99
        u = y.astype(np.float64) / 2.0**spec.bits
        assert abs(u.mean() - 0.5) < 0.05  # uniform mean 1/2, sd of the mean ~0.009
        counts = np.bincount((u * 8).astype(int), minlength=8)  # ~125 per octile
        assert counts.min() > 70 and counts.max() < 180
    assert np.mean(result.masked["node-00"] != result.masked["node-01"]) > 0.99


def test_graph_is_k_regular_and_symmetric() -> None:
    for n, k in [(10, 4), (10, 5), (9, 8), (20, 10)]:
        g = harary_graph(n, k, seed=7)
        assert all(len(a) == k for a in g)
        assert all(u in g[v - 1] for u, a in enumerate(g, start=1) for v in a)
    assert harary_graph(6, 5, seed=0)[0] == (2, 3, 4, 5, 6)
    with pytest.raises(ValueError):
        harary_graph(9, 3, seed=0)


def start(n: int = 4, t: int = 3, **kw):  # type: ignore[no-untyped-def]
    """Setup, clients and coordinator through stage 2; returns the routed shares too."""
    setup = plan_round(n, threshold=t, length=8, **kw)
    clients = {s: SecAggClient(setup, s) for s in range(1, n + 1)}
    coord = SecAggCoordinator(setup)
    books = coord.collect_adverts([c.advertise() for c in clients.values()])
    routed = coord.route_shares({s: c.share_keys(books[s]) for s, c in clients.items()})
    return setup, clients, coord, routed


def flip(share: EncryptedShare, **changes: object) -> EncryptedShare:
    return replace(share, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: flip(s, ciphertext=bytes([s.ciphertext[0] ^ 1]) + s.ciphertext[1:]),
        lambda s: flip(s, nonce=bytes([s.nonce[0] ^ 1]) + s.nonce[1:]),
        lambda s: flip(s, ciphertext=s.ciphertext[:-1]),
    ],
    ids=["ciphertext", "nonce", "truncated"],
)
def test_tampered_share_rejected(tamper) -> None:  # type: ignore[no-untyped-def]
    _, clients, _, routed = start()
    shares = list(routed[1])
    shares[0] = tamper(shares[0])
    with pytest.raises(ProtocolViolation, match="authentication"):
        clients[1].mask_input(shares, np.zeros(8))


def test_share_relabelled_to_another_sender_rejected() -> None:
    _, clients, _, routed = start()
    # the share from 2 to 1 replayed as if from 3: the associated data (and key) no longer match
    from_2 = next(s for s in routed[1] if s.sender == 2)
    others = [s for s in routed[1] if s.sender not in (2, 3)]
    with pytest.raises(ProtocolViolation):
        clients[1].mask_input([*others, from_2, flip(from_2, sender=3)], np.zeros(8))


def test_reveal_both_shares_refused() -> None:
    _, clients, _, routed = start()
    client = clients[1]
    client.mask_input(routed[1], np.zeros(8))
    with pytest.raises(RevealRefused, match="survivor and dropped"):
        client.unmask(UnmaskRequest(survivors=(1, 2, 3), dropped=(3, 4)))
    first = client.unmask(UnmaskRequest(survivors=(1, 2, 3), dropped=(4,)))
    assert [r.owner for r in first.seed_shares] == [1, 2, 3] and [r.owner for r in first.key_shares] == [4]
    with pytest.raises(RevealRefused, match="other share of peers \\[3, 4\\]"):
        client.unmask(UnmaskRequest(survivors=(1, 2, 4), dropped=(3,)))
    with pytest.raises(RevealRefused, match="not listed"):
        client.unmask(UnmaskRequest(survivors=(2, 3, 4), dropped=()))


def test_stages_out_of_order_rejected() -> None:
    setup = plan_round(3, threshold=2, length=4)
    client = SecAggClient(setup, 1)
    with pytest.raises(ProtocolViolation, match="stage 3"):
        client.mask_input((), np.zeros(4))


def test_forged_advert_signature_rejected() -> None:
    setup = plan_round(3, threshold=2, length=4)
    keys = {s: bytes([s]) * 32 for s in (1, 2, 3)}
    verify = {s: signing_public(k) for s, k in keys.items()}
    clients = {s: SecAggClient(setup, s, signing_key=keys[s], verify_keys=verify) for s in keys}
    adverts = [c.advertise() for c in clients.values()]
    forged = replace(adverts[1], mask_key=adverts[2].mask_key)  # slot 2 advert carrying slot 3's key
    with pytest.raises(ProtocolViolation, match="signature"):
        clients[1].share_keys([forged, adverts[2]])


def test_corrupted_key_share_detected_by_coordinator() -> None:
    _, clients, coord, routed = start(n=5, t=3)
    for s in (1, 2, 3, 4):
        coord.add_masked(clients[s].mask_input(routed[s], np.zeros(8)))
    request = coord.unmask_request()
    assert request.dropped == (5,)
    responses = [clients[s].unmask(request) for s in (1, 2, 3, 4)]
    bad = responses[0].key_shares[0]
    responses[0] = replace(responses[0], key_shares=(replace(bad, share=bytes(len(bad.share))),))
    with pytest.raises(ProtocolViolation, match="mask key of slot 5"):
        coord.finish(responses)


def test_bench_smoke() -> None:
    from fedloom.secagg.bench import bench_one

    row = bench_one(12, length=200, sparse=True, dropout=0.2)
    assert row["k"] == 8 and row["t"] == 5 and row["coord unmask"] > 0
