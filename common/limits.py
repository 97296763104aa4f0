"""What FLUX.2 itself allows, in one place."""

from __future__ import annotations

# Pixel sides must be multiples of 16: the VAE downsamples by 8, then latents are patchified 2x2.
SIDE_MULTIPLE = 16

# FLUX.2 conditions on at most 10 images (an edit's base image counts as one).
MAX_REFERENCES = 10

# Refuse decompression bombs well before they exhaust memory.
MAX_PIXELS = 64_000_000


def side_problem(value: int | None) -> str | None:
    """A config-check message when `value` is not a usable pixel side, else None."""
    if value is None or (value > 0 and value % SIDE_MULTIPLE == 0):
        return None
    return (
        f"must be a positive multiple of {SIDE_MULTIPLE}, got {value} (try {nearest_side(value)})"
    )


def nearest_side(value: int) -> int:
    return max(SIDE_MULTIPLE, round(value / SIDE_MULTIPLE) * SIDE_MULTIPLE)
