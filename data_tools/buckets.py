"""Aspect-ratio buckets: equal-area sizes around a target resolution, sides multiples of
SIDE_MULTIPLE (common/limits.py).

A batch holds one bucket only, because the transformer reads RoPE position ids from its first sample.
"""

from __future__ import annotations

import math

from common.limits import SIDE_MULTIPLE


def make_buckets(resolution: int, max_ratio: float = 4.0, multiple: int = SIDE_MULTIPLE) -> list[tuple[int, int]]:
    """All (width, height) with sides multiples of `multiple`, area <= resolution^2, aspect within max_ratio."""
    area = resolution * resolution
    buckets = set()
    w = multiple
    while w <= resolution * math.sqrt(max_ratio):
        h = (area // w) // multiple * multiple
        if h >= multiple and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
        w += multiple
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest log aspect ratio (ties: the larger area)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
