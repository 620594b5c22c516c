"""The fused Metal path of a decode step: one kernel reads the packed ring and the
full-precision tokens (``mlxkv.kernels.sdpa_quantized``), with no dequantized copy and
no score matrix. ``fused_inputs`` is the one place that decides whether a cache takes it."""

from __future__ import annotations

import mlx.core as mx

from ..kernels import QuantizedKV, attention_mass, metal_enabled
from ..kernels.sdpa_quantized import fused_available, sdpa_quantized_metal, sdpa_quantized_reference
from .eviction import Eviction
from .layout import Layout


def _packed(kc, vc, keys: tuple, values: tuple, length: int) -> QuantizedKV:
    """A ring in the codecs ``kc``/``vc`` as the fused kernel reads it."""
    return QuantizedKV(keys=keys, values=values, length=length, key_bits=kc.bits,
                       key_group=kc.group, value_bits=vc.bits, value_group=vc.group,
                       key_mode=kc.axis)


def _decode_rows(eviction: Eviction) -> tuple[int, int] | None:
    """The rows of a decode step's query the eviction strategy learns from (None: none)."""
    return eviction.observed_rows((0, 1, 1))


def fused_inputs(layout: Layout, eviction: Eviction, q: mx.array):
    """(ring, float keys, float values, observed rows) for the fused decode kernel, or
    None: Metal is on, the ring is in codecs the kernel reads, each kv head has its own
    ring (not a shared pool), there is no middle (the kernel reads one ring), and the
    kernel supports the shapes."""
    if not (metal_enabled() and layout.ring_len and layout.kc.fusable and layout.vc.fusable
            and not eviction.shared_slots and not layout.middle):
        return None
    ring = _packed(layout.kc, layout.vc, layout.ring_keys, layout.ring_values, layout.ring_len)
    fk, fv = layout.float_part()
    rows = _decode_rows(eviction)
    return (ring, fk, fv, rows) if fused_available(ring, q, fk, fv, stats=rows is not None) else None


def attend_fused(q, scale, ring: QuantizedKV, fk, fv, rows: tuple[int, int] | None, *,
                 sinks: int):
    """One decode query (B, Hq, 1, D) over the packed ring then the float tokens (the
    first ``sinks`` of them sinks, then the residual) -> (output, mass), for inputs
    ``fused_inputs`` gave. With ``rows`` (an eviction strategy learning from attention)
    the same call gives each held token's attention mass (B, H, T) in segment order
    (sinks, ring, residual); else mass is None."""
    stats = rows is not None
    args = dict(scale=scale, ring=ring, float_keys=fk, float_values=fv, stats=stats)
    out = sdpa_quantized_metal(q, **args)
    if out is None:  # the kernel failed on this device just now (and is turned off)
        out = sdpa_quantized_reference(q, **args)
    if not stats:
        return out, None
    out, scores, lse = out
    mass = attention_mass(scores, lse, kv_heads=fk.shape[1], rows=rows)
    nq = ring.length
    # kernel order (ring, sinks, residual) -> segment order (sinks, ring, residual)
    mass = mx.concatenate([mass[..., nq : nq + sinks], mass[..., :nq], mass[..., nq + sinks :]], -1)
    return out, mass


def preflight(cache, *, dtype: mx.Dtype, head_dim: int, gqa: int) -> None:
    """Compile and run once, on tiny inputs and each in its own evaluation, every Metal
    kernel instantiation ``cache``'s decode steps will use (the ring's quantizer, both
    variants of the fused attention, the attention mass a scoring policy reads), so the
    first use of each mid-generation costs no compile, and one Apple's compiler rejects
    is turned off now (``kernels._metal.launch``). ``gqa``: query heads per kv head (the
    kernels are built per group of query heads). Nothing to do without Metal."""
    layout, eviction = cache.layout, cache.eviction
    if not metal_enabled() or not (layout.kc.bits or layout.vc.bits):
        return
    x = mx.zeros((1, gqa, 1, head_dim), dtype)
    for codec in (layout.kc, layout.vc, layout.mkc, layout.mvc):
        if codec is not None and codec.bits is not None:
            mx.eval(codec.encode(mx.zeros((1, 1, codec.block, head_dim), dtype)))
    if not (layout.kc.fusable and layout.vc.fusable) or eviction.shared_slots or layout.middle:
        return
    kc, vc = layout.kc, layout.vc
    slots = max(kc.block, 32)
    ring = _packed(kc, vc, kc.alloc(1, 1, slots, head_dim, dtype),
                   vc.alloc(1, 1, slots, head_dim, dtype), slots)
    fk = fv = mx.zeros((1, 1, 2, head_dim), dtype)
    stats = _decode_rows(eviction) is not None
    for passes in (1, 2):
        if fused_available(ring, x, fk, fv, stats=stats):
            out = sdpa_quantized_metal(x, scale=1.0, ring=ring, float_keys=fk, float_values=fv,
                                       stats=stats, passes=passes)
            if stats and out is not None:
                mx.eval(attention_mass(out[1], out[2], kv_heads=1, rows=(0, 1)))
