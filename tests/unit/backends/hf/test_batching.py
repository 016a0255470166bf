"""backends/hf/batching: graph buckets, cache sizing, padding, receivers, batch checks (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from multitenant.backends.hf.batching import (
    CACHE_LEN_MULTIPLE,
    batch_buckets,
    bucket_for,
    cache_length,
    check_batch,
    decode_write_slot,
    left_pad,
    normalize_buckets,
    receivers,
    right_pad,
    window_buckets,
)

# ---------------------------------------------------------------------------------------------
# pure helpers


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [(1, [1]), (2, [1, 2]), (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12]), (32, [1, 2, 4, 8, 16, 32])],
)
def test_batch_buckets(max_batch, expected):
    assert batch_buckets(max_batch) == expected


def test_batch_buckets_rejects_zero():
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_window_buckets_full_closed_loop_needs_only_the_full_batch():
    # concurrency >= max_batch: every batch is full, so warm-up compiles one graph, not four
    assert window_buckets(8, "closed", 8) == [8]
    assert window_buckets(8, "closed", 16) == [8]
    # fewer in flight than the batch, or open-loop arrivals: partial batches of any size
    assert window_buckets(8, "closed", 3) == [1, 2, 4, 8]
    assert window_buckets(8, "poisson", 8) == [1, 2, 4, 8]
    assert window_buckets(1, "closed", 1) == [1]


def test_bucket_for_picks_smallest_that_fits():
    b = [1, 2, 4, 8, 12]
    assert [bucket_for(n, b) for n in (1, 2, 3, 4, 5, 8, 9, 12)] == [1, 2, 4, 4, 8, 8, 12, 12]
    with pytest.raises(ValueError, match="raise max_batch"):
        bucket_for(13, b)


def test_normalize_buckets():
    assert normalize_buckets(None, 8) == [1, 2, 4, 8]
    assert normalize_buckets([8, 1, 8], 8) == [1, 8]
    with pytest.raises(ValueError, match="max_batch"):
        normalize_buckets([1, 4], 8)  # a batch of 5..8 would have no graph
    with pytest.raises(ValueError):
        normalize_buckets([0, 8], 8)


def test_cache_length_covers_prompt_and_output_rounded():
    assert cache_length(512, 128) == 640
    assert cache_length(500, 100) == 640
    assert cache_length(1, 1) == 64
    for i, o in [(7, 9), (100, 1), (64, 64), (65, 64)]:
        n = cache_length(i, o)
        assert n % CACHE_LEN_MULTIPLE == 0 and n >= i + o
        # the last slot a batch writes: prefill of width <= i, then o - 1 decode steps
        assert decode_write_slot(i, o - 1) < n if o > 1 else True


def test_decode_write_slot():
    assert decode_write_slot(10, 1) == 10
    assert decode_write_slot(10, 5) == 14
    with pytest.raises(ValueError):
        decode_write_slot(10, 0)


def test_left_pad_aligns_last_tokens_and_counts_positions_from_zero():
    p = left_pad([np.array([5, 6, 7]), np.array([9]), np.array([1, 2])], pad_id=0)
    assert p.width == 3 and p.lengths.tolist() == [3, 1, 2]
    assert p.input_ids.tolist() == [[5, 6, 7], [0, 0, 9], [0, 1, 2]]
    assert p.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert p.position_ids.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert p.input_ids.dtype == np.int64 and p.position_ids.dtype == np.int64


def test_left_pad_of_one_full_width_prompt_has_no_padding():
    p = left_pad([np.arange(4)], pad_id=7)
    assert p.input_ids.tolist() == [[0, 1, 2, 3]] and p.attention_mask.tolist() == [[1, 1, 1, 1]]


def test_right_pad():
    ids, mask = right_pad([np.array([5, 6, 7]), np.array([9])], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [9, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_receivers():
    n_out = [4, 1, 6]
    assert [receivers(n_out, s) for s in range(7)] == [[0, 1, 2], [0, 2], [0, 2], [0, 2], [2], [2], []]


@pytest.mark.parametrize(
    ("prompts", "n_out", "needle"),
    [
        ([], [], "empty batch"),
        ([[1]] * 5, [1] * 5, "exceeds max_batch"),
        ([[1], [2]], [1], "output lengths"),
        ([[]], [1], "empty"),
        ([[1] * 33], [1], "max_input_len"),
        ([[1]], [17], "max_output_len"),
        ([[1]], [0], "max_output_len"),
    ],
)
def test_check_batch_errors(prompts, n_out, needle):
    with pytest.raises(ValueError) as e:
        check_batch(prompts, n_out, max_batch=4, max_input_len=32, max_output_len=16)
    assert needle in str(e.value) and "\n" not in str(e.value)
