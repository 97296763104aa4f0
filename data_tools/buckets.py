"""Aspect-ratio buckets: equal-area sizes around a target resolution on a grid of `bucket_step(resolution)` px.

A batch holds one bucket only, because the transformer reads RoPE position ids from its first sample. A fine grid
gives nearly every photo its own bucket, so batches of more than one would rarely form: the grid is resolution/16
(64 px at 1024, 32 at 512; never finer than the 16 px FLUX.2 needs), and buckets too small to fill a batch are
merged into their nearest neighbour by aspect.
"""

from __future__ import annotations

import math

from common.limits import SIDE_MULTIPLE


def bucket_step(resolution: int) -> int:
    """The bucket grid for a training resolution: resolution/16, a multiple of 16 (1024 -> 64, 512 -> 32)."""
    return max(SIDE_MULTIPLE, round(resolution / 16 / SIDE_MULTIPLE) * SIDE_MULTIPLE)


def make_buckets(
    resolution: int, max_ratio: float = 4.0, step: int | None = None
) -> list[tuple[int, int]]:
    """All (width, height) on the grid, area <= resolution^2, aspect within max_ratio."""
    step = step or bucket_step(resolution)
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * math.sqrt(max_ratio):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
        w += step
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest log aspect ratio (ties: the larger area)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def merge_small_buckets(assigned: dict, min_size: int) -> dict:
    """{item: bucket} with the items of buckets holding fewer than `min_size` moved into the nearest (by aspect)
    bucket, until every bucket can fill a batch (or one bucket is left)."""
    assigned = dict(assigned)
    while True:
        counts: dict[tuple[int, int], int] = {}
        for b in assigned.values():
            counts[b] = counts.get(b, 0) + 1
        small = sorted((c, b) for b, c in counts.items() if c < min_size)
        if not small or len(counts) == 1:
            return assigned
        _, victim = small[0]
        others = [b for b in counts if b != victim]
        target = min(
            others,
            key=lambda b: (
                abs(math.log(b[0] / b[1]) - math.log(victim[0] / victim[1])),
                -counts[b],
            ),
        )
        assigned = {k: (target if v == victim else v) for k, v in assigned.items()}


def upscale_factor(width: int, height: int, bucket: tuple[int, int]) -> float:
    """How much an image is enlarged to cover its bucket (> 1: upscaled)."""
    return max(bucket[0] / width, bucket[1] / height)
