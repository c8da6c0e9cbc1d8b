"""Buffer reuse, the blockwise helpers and the allocator settings."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.buffers import BLOCK, Recycler, add_scaled, all_finite, tune_allocator


def test_a_buffer_is_reused_only_once_nothing_references_it() -> None:
    recycler = Recycler()
    first = recycler.take(64).view(np.float32)  # a view keeps its buffer out of reuse
    second = recycler.take(64)
    assert second.base is not first.base and second is not first.base
    recycler.next_round()
    del second
    again = recycler.take(64)
    assert again is not first.base  # the viewed buffer is still in use
    assert recycler.take(64) is not again  # nor is a buffer handed out twice in one round
    recycler.next_round()
    del first, again
    assert recycler.held_bytes == 2 * 64  # the buffers taken in the last round
    reused = {id(recycler.take(64)), id(recycler.take(64))}
    assert len(reused) == 2 and recycler.held_bytes == 2 * 64  # no new allocation


def test_buffers_not_taken_for_the_given_generations_are_dropped() -> None:
    recycler = Recycler(generations=2)  # a coordinator's sums: the global weights next round, free the one after
    recycler.take(32)
    recycler.next_round()
    recycler.next_round()
    assert recycler.held_bytes == 32  # kept for reuse two rounds after it was taken
    recycler.next_round()
    assert recycler.held_bytes == 0
    with pytest.raises(ValueError, match="generations"):
        Recycler(generations=0)


def test_array_is_shaped_on_a_taken_buffer() -> None:
    recycler = Recycler()
    array = recycler.array((3, 4), np.float64)
    assert array.shape == (3, 4) and array.dtype == np.float64 and array.flags.writeable


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_value_in_any_block(dtype, bad) -> None:
    array = np.ones(2 * BLOCK + 5, dtype)
    assert all_finite(array) and all_finite(array[:0])
    for where in (0, BLOCK + 1, array.size - 1):
        bad_array = array.copy()
        bad_array[where] = bad
        assert not all_finite(bad_array)


@pytest.mark.parametrize("w", [1, 7])
@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float32, np.float64), (np.int64, np.float64)])
def test_add_scaled_matches_the_whole_array_expression(w, dtypes) -> None:
    rng = np.random.default_rng(0)
    out = rng.normal(size=BLOCK + 3).astype(dtypes[1])
    array = (rng.normal(size=out.size) * 100).astype(dtypes[0])
    expected = out + (array.astype(out.dtype) * w if w != 1 else array)
    add_scaled(out, array, w)
    np.testing.assert_array_equal(out, expected)


def test_tune_allocator_reports_whether_it_applied() -> None:
    assert isinstance(tune_allocator(), bool)


def test_without_trustworthy_reference_counts_every_buffer_is_fresh(monkeypatch) -> None:
    import fedloom.buffers as buffers

    assert buffers._reuse_is_safe()  # CPython: the self-check passes
    monkeypatch.setattr(buffers, "_REUSE_IS_SAFE", False)
    recycler = Recycler()
    first = recycler.take(16)
    del first
    recycler.next_round()
    assert recycler.held_bytes == 0 and recycler.take(16).nbytes == 16  # nothing held, so nothing reused
