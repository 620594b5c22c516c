"""``CodebookCodec``: keys or values as codes of an optimal scalar codebook after a
randomized Hadamard rotation (TurboQuant's MSE stage).

After the rotation (``rotation.py``), each coordinate of a head vector divided by its norm,
times sqrt(D), follows one known distribution (that of a coordinate of a random point on
the sphere: density ∝ (1 - x²/D)^((D-3)/2), close to N(0, 1)). Each coordinate is coded
with the Lloyd-Max codebook of that distribution (2^bits levels, ``lloyd_max``); the
vector keeps one scale, stored as float16: its norm times the least-squares fit of the
coded direction. Nothing depends on the data, so there are no per-group scales and biases:
``bits`` + 16 / D bits per element (3.25 at 3 bits for D = 64).

Storage of n slots (B batch, H kv heads, D head dim): the codes as bit planes of 4, 2 or 1
bits (3 bits: a 2-bit plane and a 1-bit plane, so no code straddles two words), each
(B, H, n, D * width / 32) uint32, then the scales (B, H, n, 1) float16; with the sketch,
its sign words (B, H, n, D / 32) uint32 and norms (B, H, n, 1) float16; with ``outliers``
k, each vector's k largest values kept exactly before the rotation (KVQuant's
dense-and-sparse), their channels (B, H, n, k) uint8 and values (B, H, n, k) float16.
Attention works in the rotated space: queries are rotated (scores are unchanged by an
orthonormal rotation), and the weighted sum of values is rotated back once per query row;
the outliers add q[channel] * value to a key's score.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from ..kernels.codebook_attention import (codebook_preflight, codebook_scores, codebook_weighted,
                                          vectors_reference)
from ..kernels.codebook_attention import codes as codes_of
from .rotation import hadamard_signs, rotate, unrotate

CODEBOOK_BITS = (2, 3, 4)
PLANES = {2: (2,), 3: (2, 1), 4: (4,)}  # bit-plane widths of a code, low bits first


@lru_cache(maxsize=None)
def lloyd_max(bits: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(levels, boundaries): the Lloyd-Max quantizer of ``bits`` bits for one coordinate of
    a uniformly random unit vector in R^dim scaled by sqrt(dim) (float64)."""
    reach = min(np.sqrt(dim), 10.0)
    x = np.linspace(-reach, reach, 200_001)
    f = np.clip(1.0 - x * x / dim, 0.0, None) ** ((dim - 3) / 2)
    cdf = np.cumsum(f)
    cdf /= cdf[-1]
    n = 2 ** bits
    levels = np.interp((np.arange(n) + 0.5) / n, cdf, x)  # start from the quantiles
    for _ in range(500):
        bounds = (levels[1:] + levels[:-1]) / 2
        cell = np.searchsorted(bounds, x)
        mass = np.bincount(cell, weights=f, minlength=n)
        new = np.bincount(cell, weights=f * x, minlength=n) / np.maximum(mass, 1e-300)
        if np.allclose(new, levels, atol=1e-10):
            break
        levels = new
    levels = (levels - levels[::-1]) / 2  # the density is even: so is the quantizer
    return levels, (levels[1:] + levels[:-1]) / 2


@lru_cache(maxsize=None)
def _tables(bits: int, dim: int, seed: int) -> tuple[mx.array, mx.array, mx.array]:
    levels, bounds = lloyd_max(bits, dim)
    return (mx.array(levels, dtype=mx.float32), mx.array(bounds, dtype=mx.float32),
            hadamard_signs(dim, seed))


def _pack(codes: mx.array, width: int) -> mx.array:
    """codes (..., D) uint32 < 2^width -> (..., D * width / 32) uint32."""
    per = 32 // width
    shifts = mx.arange(per, dtype=mx.uint32) * width
    grouped = codes.reshape(*codes.shape[:-1], -1, per)
    return mx.sum(grouped << shifts, axis=-1).astype(mx.uint32)  # fields do not overlap


def _hits(channel: mx.array, D: int) -> mx.array:
    """(..., D) bool: the channels ``channel`` (..., k) names."""
    return (mx.arange(D) == channel[..., None]).any(axis=-2)


@lru_cache(maxsize=None)
def _sketch_matrix(dim: int, seed: int) -> mx.array:
    """The Gaussian projection of the 1-bit residual sketch (D, D), seeded."""
    return mx.random.normal((dim, dim), key=mx.random.key(seed + 7919))


@dataclass(frozen=True)
class CodebookCodec:
    """``sketch``: keys also keep TurboQuant's second stage, the signs of a Gaussian
    projection of what the codes missed (1 bit per element, plus that residual's norm),
    which makes the inner products with queries unbiased (QJL). ``outliers``: keys keep
    their ``outliers`` largest values exactly, the rest is coded (the key channels that
    carry most of a head's energy no longer set every coordinate's scale)."""

    bits: int
    seed: int = 0
    sketch: bool = False
    outliers: int = 0  # values per vector kept exactly (keys: scores only read them)
    axis = "token"
    block = 1
    group = 32  # tokens flushed from a residual at a time (see layout.flush_unit)
    fusable = False  # the fused Metal kernel reads affine storage only (so far)

    @property
    def parts(self) -> int:
        return len(PLANES[self.bits]) + 1 + 2 * self.sketch + 2 * bool(self.outliers)

    @property
    def decodes_exactly(self) -> bool:
        """Whether its scores are those of its decoded keys: not with the sketch, which
        estimates inner products without reconstructing the keys."""
        return not self.sketch

    def bytes_per_token(self, head_dim: int, dtype_size: int) -> float:
        """Bytes one token of one kv head takes: its codes and its float16 scale (and the
        sketch's sign bits and float16 norm)."""
        return (head_dim * self.bits / 8 + 2 + (head_dim / 8 + 2) * self.sketch
                + 3 * self.outliers)

    def alloc(self, B, H, n, D, dtype):
        planes = tuple(mx.zeros((B, H, n, D * w // 32), mx.uint32) for w in PLANES[self.bits])
        sketch = (mx.zeros((B, H, n, D // 32), mx.uint32), mx.zeros((B, H, n, 1), mx.float16))
        k = self.outliers
        outliers = (mx.zeros((B, H, n, k), mx.uint8), mx.zeros((B, H, n, k), mx.float16))
        return (planes + (mx.zeros((B, H, n, 1), mx.float16),) + (sketch if self.sketch else ())
                + (outliers if k else ()))

    def grow(self, state, extra):
        return tuple(mx.concatenate([a, mx.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype)], axis=2)
                     for a in state)

    def preflight(self, dtype, head_dim: int) -> None:
        """Compile the attention kernels this codec's storage launches (both products)."""
        mx.eval(self.encode(mx.zeros((1, 1, 1, head_dim), dtype)))
        codebook_preflight(dtype=dtype, head_dim=head_dim, widths=PLANES[self.bits])

    def encode(self, x):
        """x (B, H, n, D) float -> the codes' bit planes and the scales of those n tokens
        (then the sketch's and the outliers' arrays)."""
        D = x.shape[-1]
        levels, bounds, signs = _tables(self.bits, D, self.seed)
        outliers = ()
        if self.outliers:
            channel = mx.argpartition(-mx.abs(x), kth=self.outliers - 1, axis=-1)[..., : self.outliers]
            outliers = (channel.astype(mx.uint8),
                        mx.take_along_axis(x, channel, axis=-1).astype(mx.float16))
            x = mx.where(_hits(channel, D), 0.0, x)  # the rest is coded
        xr = rotate(x.astype(mx.float32), signs)
        norm = mx.sqrt(mx.sum(xr * xr, axis=-1, keepdims=True))
        u = xr * (np.sqrt(D) / mx.maximum(norm, 1e-30))
        codes = mx.sum(u[..., None] > bounds, axis=-1).astype(mx.uint32)
        c = levels[codes]
        # the scale that fits the coded direction best (least squares), not just the norm
        fit = mx.sum(u * c, axis=-1, keepdims=True) / mx.maximum(mx.sum(c * c, axis=-1, keepdims=True), 1e-30)
        planes, low = [], 0
        for width in PLANES[self.bits]:
            planes.append(_pack((codes >> low) & ((1 << width) - 1), width))
            low += width
        scale = (norm * fit / np.sqrt(D)).astype(mx.float16)
        if not self.sketch:
            return (*planes, scale, *outliers)
        residual = xr - c * scale.astype(mx.float32)  # what the codes missed (rotated space)
        signs = (residual @ _sketch_matrix(D, self.seed).T > 0).astype(mx.uint32)
        rnorm = mx.sqrt(mx.sum(residual * residual, axis=-1, keepdims=True))
        return (*planes, scale, _pack(signs, 1), rnorm.astype(mx.float16), *outliers)

    def write(self, state, slot, x):
        self.store(state, slot, self.encode(x), x.shape[2])

    def store(self, state, slot, parts, n):
        for dst, src in zip(state, parts):
            dst[..., slot : slot + n, :] = src

    def slots(self, state, n):
        return tuple(a[..., :n, :] for a in state)

    def _dim(self, state) -> int:
        """The head dim of a storage (from its first bit plane)."""
        return state[0].shape[-1] * 32 // PLANES[self.bits][0]

    def _parts(self, state):
        k = len(PLANES[self.bits])
        return dict(planes=list(state[:k]), widths=PLANES[self.bits], scale=state[k],
                    levels=_tables(self.bits, self._dim(state), self.seed)[0])

    def _extras(self, state) -> tuple[tuple | None, tuple | None]:
        """(sketch words and norms, outlier channels and values): each None if not kept."""
        at = len(PLANES[self.bits]) + 1
        sketch = tuple(state[at : at + 2]) if self.sketch else None
        outliers = tuple(state[-2:]) if self.outliers else None
        return sketch, outliers

    def scores(self, q, state):
        D = q.shape[-1]
        qr = rotate(q, _tables(self.bits, D, self.seed)[2])
        out = codebook_scores(q=qr, **self._parts(state))
        sketch, outliers = self._extras(state)
        if sketch is None and outliers is None:
            return out
        out = out.astype(mx.float32)
        if sketch is not None:
            # + |r| sqrt(pi/2) / D <S q, sign(S r)>: an unbiased estimate of <q, r>
            words, rnorm = sketch
            signs = 2.0 * codes_of([words], (1,)).astype(mx.float32) - 1.0
            sq = qr.astype(mx.float32) @ _sketch_matrix(D, self.seed).T
            out = out + (sq @ signs.swapaxes(-1, -2)) * (rnorm.astype(mx.float32).swapaxes(-1, -2)
                                                         * (np.sqrt(np.pi / 2) / D))
        if outliers is not None:
            # + q[channel] * value for each kept value: a gather of M * n * k query entries
            channel, value = outliers
            B, H, M, _ = q.shape
            n, k = channel.shape[2], channel.shape[3]
            at = mx.broadcast_to(channel.reshape(B, H, 1, n * k).astype(mx.int32), (B, H, M, n * k))
            picked = mx.take_along_axis(q.astype(mx.float32), at, axis=-1).reshape(B, H, M, n, k)
            out = out + mx.sum(picked * value.astype(mx.float32)[:, :, None], axis=-1)
        return out.astype(q.dtype)

    def weighted(self, p, state):
        if self.outliers:
            raise ValueError("outliers are kept for keys, which attention only scores")
        out = codebook_weighted(p=p, **self._parts(state))
        return unrotate(out, _tables(self.bits, self._dim(state), self.seed)[2])

    def decode(self, state):
        v = vectors_reference(**self._parts(state), dtype=mx.float32)
        v = unrotate(v, _tables(self.bits, self._dim(state), self.seed)[2])
        _, outliers = self._extras(state)
        if outliers is None:
            return v
        # the coded rest plus the kept values (as scores add them: the rest's coding error
        # at those channels stays, so a key's decode and its scores agree)
        channel, value = outliers
        hit = mx.arange(v.shape[-1]) == channel.astype(mx.int32)[..., None]  # (B, H, n, k, D)
        return v + mx.sum(mx.where(hit, value.astype(mx.float32)[..., None], 0.0), axis=-2)
