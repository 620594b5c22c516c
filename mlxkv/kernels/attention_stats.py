"""Attention mass per cached token for eviction policies
(``metal_kernels/attention_stats.metal``), from the scores and log-sum-exp the fused
attention (``sdpa_quantized(..., stats=True)``) wrote: no second pass over the cache."""

from __future__ import annotations

import mlx.core as mx

from . import _metal


def attention_mass_metal(scores: mx.array, lse: mx.array, *, kv_heads: int,
                         rows: tuple[int, int]) -> mx.array:
    """scores (B, Hq, L, T) float32, lse (B, Hq, L) -> mass (B, H, T) float32."""
    B, Hq, L, T = scores.shape
    outs = _metal.launch(
        "attention_stats", ["scores", "lse", "dims"], ["mass"], template=[],
        inputs=[scores, lse, mx.array([kv_heads, Hq, L, T, rows[0], rows[1]], mx.int32)],
        grid=(T, B * kv_heads, 1), threadgroup=(min(T, 256), 1, 1),
        output_shapes=[(B, kv_heads, T)], output_dtypes=[mx.float32])
    return None if outs is None else outs[0]


def attention_mass_reference(scores, lse, *, kv_heads, rows):
    B, Hq, L, T = scores.shape
    p = mx.exp(scores - lse[..., None])[:, :, rows[0] : rows[1]]
    return p.reshape(B, kv_heads, Hq // kv_heads * (rows[1] - rows[0]), T).sum(axis=2)


def attention_mass(scores: mx.array, lse: mx.array, *, kv_heads: int,
                   rows: tuple[int, int] | None = None) -> mx.array:
    """Attention each token got from query rows ``rows`` (default all), summed over the
    query heads of each kv head: (B, kv_heads, T) float32."""
    rows = rows or (0, scores.shape[2])
    supported = scores.dtype == mx.float32 and scores.shape[1] % kv_heads == 0 and scores.size > 0
    if _metal.use_metal(supported):
        mass = attention_mass_metal(scores, lse, kv_heads=kv_heads, rows=rows)
        if mass is not None:
            return mass
    return attention_mass_reference(scores, lse, kv_heads=kv_heads, rows=rows)
