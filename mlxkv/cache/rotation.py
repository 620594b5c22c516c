"""The randomized Hadamard rotation: ``x -> H (s * x)``, H the orthonormal Hadamard matrix
(``mx.hadamard_transform``), s a seeded random ±1 diagonal. It spreads a vector's energy
evenly over its coordinates (outlier channels included), so each coordinate of a rotated
unit vector follows one known distribution."""

from __future__ import annotations

import mlx.core as mx


def hadamard_signs(dim: int, seed: int) -> mx.array:
    """The random ±1 diagonal of a randomized Hadamard rotation (same seed, same signs)."""
    key = mx.random.key(seed)
    return mx.where(mx.random.bernoulli(0.5, (dim,), key=key), 1.0, -1.0)


def rotate(x: mx.array, signs: mx.array) -> mx.array:
    return mx.hadamard_transform(x * signs.astype(x.dtype))


def unrotate(y: mx.array, signs: mx.array) -> mx.array:
    """The inverse of ``rotate`` (H is symmetric and orthonormal)."""
    return mx.hadamard_transform(y) * signs.astype(y.dtype)
