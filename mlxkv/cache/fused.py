"""The fused Metal path of a decode step: one kernel reads the packed ring and the
full-precision tokens (``mlxkv.kernels.sdpa_quantized``), with no dequantized copy and
no score matrix. ``fused_inputs`` is the one place that decides whether a cache takes it."""

from __future__ import annotations

import mlx.core as mx

from ..kernels import QuantizedKV, attention_mass, metal_enabled, sdpa_quantized
from ..kernels.sdpa_quantized import fused_available
from .eviction import Eviction
from .layout import Layout


def fused_inputs(layout: Layout, eviction: Eviction, q: mx.array):
    """(ring, float keys, float values) for the fused decode kernel, or None: Metal is
    on, the ring is in codecs the kernel reads, each kv head has its own ring (not a
    shared pool), and the kernel supports the shapes."""
    if not (metal_enabled() and layout.ring_len and layout.kc.fusable and layout.vc.fusable
            and not eviction.shared_slots):
        return None
    kc, vc = layout.kc, layout.vc
    ring = QuantizedKV(keys=layout.ring_keys, values=layout.ring_values, length=layout.ring_len,
                       key_bits=kc.bits, key_group=kc.group, value_bits=vc.bits,
                       value_group=vc.group, key_mode=kc.axis)
    fk, fv = layout.float_part()
    return (ring, fk, fv) if fused_available(ring, q, fk, fv) else None


def attend_fused(q, scale, ring: QuantizedKV, fk, fv, *, sinks: int,
                 rows: tuple[int, int] | None):
    """One decode query (B, Hq, 1, D) over the packed ring then the float tokens (the
    first ``sinks`` of them sinks, then the residual) -> (output, mass). With ``rows`` (an eviction strategy learning from
    attention) the same call gives each held token's attention mass (B, H, T) in segment
    order (sinks, ring, residual); else mass is None."""
    if rows is None:
        return sdpa_quantized(q, scale=scale, ring=ring, float_keys=fk, float_values=fv), None
    out, scores, lse = sdpa_quantized(q, scale=scale, ring=ring, float_keys=fk,
                                      float_values=fv, stats=True)
    mass = attention_mass(scores, lse, kv_heads=fk.shape[1], rows=rows)
    nq = ring.length
    # kernel order (ring, sinks, residual) -> segment order (sinks, ring, residual)
    mass = mx.concatenate([mass[..., nq : nq + sinks], mass[..., :nq], mass[..., nq + sinks :]], -1)
    return out, mass
