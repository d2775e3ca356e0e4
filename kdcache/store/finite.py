"""NaN and infinity checks on the store's float arrays by their bit patterns.

numpy has no float16 arithmetic of its own: ``np.isnan`` on an fp16 map converts every element
first, on every sample a reader checks. An IEEE float is NaN when its exponent bits are all set
and its mantissa is not zero, infinite when the exponent is all set and the mantissa zero: with
the sign masked off, NaN is a magnitude above the infinity's bits, non-finite one at or above
them. Integer compares on the same bits give the same answer without the conversion.
"""

from __future__ import annotations

import numpy as np

#: itemsize -> (unsigned view, sign-free mask, the bits of +infinity)
_BITS = {2: (np.uint16, 0x7FFF, 0x7C00),
         4: (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
         8: (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000)}


def _magnitude(a: np.ndarray) -> tuple[np.ndarray, int]:
    kind, mask, inf = _BITS[a.dtype.itemsize]
    return np.ascontiguousarray(a).view(kind) & kind(mask), inf


def nan_rows(block: np.ndarray) -> np.ndarray:
    """Whether each row (first axis) of a float block holds a NaN (the fill value of a lost chunk)."""
    if block.dtype.kind != "f" or block.size == 0:
        return np.zeros(len(block), bool)
    bits, inf = _magnitude(block)
    return (bits.reshape(len(block), -1) > inf).any(axis=1)


def all_finite(a: np.ndarray) -> bool:
    """No NaN and no infinity in a float array (any other array: True)."""
    return count_non_finite(a) == 0


def count_non_finite(a: np.ndarray) -> int:
    if a.dtype.kind != "f" or a.size == 0:
        return 0
    bits, inf = _magnitude(a)
    return int(np.count_nonzero(bits >= inf))
