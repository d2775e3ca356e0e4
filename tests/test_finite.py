"""The store's bit-pattern NaN and infinity checks against numpy's own float tests."""

import numpy as np
import pytest

from kdcache.store.finite import all_finite, count_non_finite, nan_rows


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_bit_checks_agree_with_numpy_on_every_kind_of_value(dtype):
    info = np.finfo(dtype)
    special = np.array([0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, -info.tiny,
                        info.smallest_subnormal, -info.smallest_subnormal, np.inf, -np.inf, np.nan, -np.nan], dtype)
    # every fp16 bit pattern (NaNs of every payload, both signs); random bit patterns of the wider types,
    # with their exponent often all ones (NaNs and infinities)
    if dtype == np.float16:
        values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    else:
        kind = np.uint32 if dtype == np.float32 else np.uint64
        mantissa = 23 if dtype == np.float32 else 52
        exponent = kind(((1 << (8 * np.dtype(kind).itemsize - 1 - mantissa)) - 1) << mantissa)  # all its bits
        bits = np.random.default_rng(0).integers(0, np.iinfo(kind).max, 4096, dtype=kind, endpoint=True)
        bits[::3] |= exponent  # NaNs (and, rarely, infinities)
        bits[1::3] &= ~exponent  # zeros and subnormals
        values = bits.view(dtype)
    for a in (special, values):
        rows = a[: len(a) // 2 * 2].reshape(-1, 2)
        assert np.array_equal(nan_rows(rows), np.isnan(rows).any(axis=1))
        assert all_finite(a) == bool(np.isfinite(a).all())
        assert count_non_finite(a) == int((~np.isfinite(a)).sum())
    # a NaN with any payload, negative or not, in one row of a block
    block = np.ones((5, 3, 4, 4), dtype)
    bits = block.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[block.itemsize])
    bits[3, 1, 2, 0] = np.iinfo(bits.dtype).max  # every bit set: a negative NaN
    assert nan_rows(block).tolist() == [False, False, False, True, False]
    assert not all_finite(block) and count_non_finite(block) == 1
    assert all_finite(block[:3]) and nan_rows(block[:0]).shape == (0,)


def test_non_float_arrays_are_finite():
    assert all_finite(np.arange(5, dtype=np.uint8)) and count_non_finite(np.arange(5)) == 0
    assert not nan_rows(np.zeros((3, 2), np.int32)).any()


def test_a_non_contiguous_block_is_read_by_value():
    a = np.ones((4, 6), np.float16)
    a[2, 1] = np.nan
    assert nan_rows(a[:, ::2]).tolist() == [False, False, False, False]
    assert nan_rows(a[:, 1::2]).tolist() == [False, False, True, False]
