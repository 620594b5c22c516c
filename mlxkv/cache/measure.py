"""What a compressed cache holds, for the live statistics (``CacheStats``)."""

from __future__ import annotations

from ..stats import LayerStats, dtype_name


def layer_stats(cache) -> LayerStats:
    """Tokens seen, kept (at full precision and by bits) and evicted, and the bytes a
    ``CompressedCache`` takes, uses and would take dense."""
    lay = cache.layout
    held_full = lay.n_sinks + lay.res_len
    ring_bits = lay.kc.bits or lay.vc.bits
    ring = cache.eviction.tokens_per_head(lay)
    kept = held_full + ring + lay.mid_len
    if lay.empty:
        return LayerStats(seen=cache.offset, kept_full=0, kept_quantized={},
                          evicted=cache.offset, nbytes=0, fp16_nbytes=0, used_nbytes=0,
                          dense_nbytes=0)
    B, H, _, Dk = lay.sink_keys.shape
    head = B * H * (Dk + lay.sink_values.shape[3])
    dtype = lay.sink_keys.dtype
    # the ring's arrays (and per-slot metadata) in use, in proportion to its filled slots
    ring_bytes = cache.nbytes - lay.full_nbytes - lay.middle_nbytes
    ring_used = (ring_bytes * lay.ring_len // max(lay.alloc, 1)
                 + lay.middle_nbytes * lay.mid_len // max(lay.middle_capacity, 1))
    quantized = {}
    for bits, n in ((ring_bits, ring), (lay.middle_bits, lay.mid_len)):
        if bits and n:
            quantized[bits] = quantized.get(bits, 0) + n
    return LayerStats(
        seen=cache.offset,
        kept_full=held_full + (0 if ring_bits else ring),
        kept_quantized=quantized,
        evicted=cache.offset - kept,
        nbytes=cache.nbytes,
        fp16_nbytes=2 * head * kept,
        used_nbytes=head * dtype.size * held_full + ring_used,
        dense_nbytes=head * dtype.size * kept,
        dtype=dtype_name(dtype),
    )
