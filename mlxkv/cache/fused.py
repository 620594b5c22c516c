"""The fused Metal path of a decode step: one launch (two for a long cache: a split over
token blocks) reads the packed ring and the full-precision tokens, with no dequantized
copy and no score matrix; quantizes the step's new token itself when it goes straight
into the ring (no quantizer launch); and reduces the attention mass a scoring policy
learns from (no launch of its own). ``decide`` is the one place that decides whether a
decode step takes it, once per layer and step."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from ..kernels import QuantizedKV, metal_enabled
from ..kernels.sdpa_quantized import (NewToken, fused_available, sdpa_quantized_metal,
                                      sdpa_quantized_reference)
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


def takes(layout: Layout, eviction: Eviction) -> bool:
    """Metal is on, the ring is in codecs the kernel reads, each kv head has its own ring
    (not a shared pool) and there is no middle (the kernel reads one ring)."""
    return (metal_enabled() and layout.kc.fusable and layout.vc.fusable
            and not eviction.shared_slots and not layout.middle)


class DecodeStep(NamedTuple):
    """A decode step's decision, taken once per layer and step (``decide``) and consumed
    by the cache's ``attend``."""

    fused: bool          # try the fused kernel (else attention over segments)
    new: tuple | None    # the step's (keys, values) the kernel stores into the ring, or None


def decide(layout: Layout, eviction: Eviction, straight: tuple | None) -> DecodeStep:
    """The one decision of a decode step: the fused kernel or segments, and whether the
    step's token (``straight``: its (keys, values) when storing it puts it straight into
    the ring, else None) is left for the kernel to quantize and store."""
    fusable = takes(layout, eviction)
    return DecodeStep(fusable, straight if fusable else None)


def _joined(parts: list) -> mx.array:
    parts = [p for p in parts if p.shape[-1]]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def decode(layout: Layout, eviction: Eviction, q: mx.array, scale: float, step: DecodeStep):
    """One decode query (B, Hq, 1, D) over the cache, on the path ``step`` chose ->
    (output, mass), or None (nothing changed) when the kernel does not take these shapes.

    ``step.new``: the step's (keys, values) (B, H, 1, D) when they go straight into the ring:
    the eviction strategy places them (``Eviction.place``), the kernel quantizes them
    into that slot as it attends, and their codes are stored after it; without ``new``
    the tokens are stored already. ``mass`` (an eviction strategy learning from
    attention; else None) is each held token's attention mass (B, H, T) in segment order
    (sinks, ring, residual), the ring in its order after the store."""
    new = step.new
    placement = None
    if new is not None:
        placement = eviction.place(layout, *new)
        if placement is None:
            return None
    length = layout.ring_len if placement is None else placement.length
    if not length:
        return None
    ring = _packed(layout.kc, layout.vc, layout.ring_keys, layout.ring_values, length)
    sinks = layout.sink_part() if layout.n_sinks else None
    fk, fv = layout.held_residual()
    rows = _decode_rows(eviction)
    token = None if placement is None else NewToken(*new, placement.slot)
    if not fused_available(ring, q, fk, fv, stats=rows is not None, new=token is not None,
                           sinks=sinks):
        return None
    args = dict(scale=scale, ring=ring, float_keys=fk, float_values=fv, mass_rows=rows, new=token,
                sinks=sinks)
    got = sdpa_quantized_metal(q, **args)
    if got is None:  # the kernel failed on this device just now (and is turned off)
        got = sdpa_quantized_reference(q, **args)
    if placement is not None:
        placement.store(got.new_keys, got.new_values)
    if rows is None:
        return got.out, None
    n_sinks = layout.n_sinks
    ring_mass = got.mass[..., :length]
    if placement is not None and placement.ring_order is not None:
        ring_mass = placement.ring_order(ring_mass)
    # kernel order (ring, sinks, residual) -> segment order (sinks, ring, residual)
    mass = _joined([got.mass[..., length : length + n_sinks], ring_mass,
                    got.mass[..., length + n_sinks :]])
    return got.out, mass


def preflight(cache, *, dtype: mx.Dtype, head_dim: int, gqa: int) -> None:
    """Compile and run once, on tiny inputs and each in its own evaluation, every Metal
    kernel instantiation ``cache``'s decode steps will use (the ring's quantizer for
    prompt chunks, both variants of the fused attention: with the new token quantized
    inside when decode tokens go straight into the ring, else without; each with the
    attention mass when a scoring policy reads it; a codebook's products), so the first
    use of each mid-generation costs no compile, and one Apple's compiler rejects is turned off now
    (``kernels._metal.launch``). ``gqa``: query heads per kv head (the kernels are built
    per group of query heads). Nothing to do without Metal."""
    layout, eviction = cache.layout, cache.eviction
    if not metal_enabled() or not (layout.kc.bits or layout.vc.bits):
        return
    x = mx.zeros((1, gqa, 1, head_dim), dtype)
    for codec in (layout.kc, layout.vc, layout.mkc, layout.mvc):
        if codec is not None:
            codec.preflight(dtype, head_dim)
    if not takes(layout, eviction):
        return
    kc, vc = layout.kc, layout.vc
    slots = max(kc.block, 32)
    ring = _packed(kc, vc, kc.alloc(1, 1, slots, head_dim, dtype),
                   vc.alloc(1, 1, slots, head_dim, dtype), slots)
    fk = fv = mx.zeros((1, 1, 2, head_dim), dtype)
    rows = _decode_rows(eviction)
    new = None
    if layout.straight_to_ring():
        token = mx.zeros((1, 1, 1, head_dim), dtype)
        new = NewToken(token, token, mx.zeros((1, 1), mx.int32))
    for passes in (1, 2):
        if fused_available(ring, x, fk, fv, stats=rows is not None, new=new is not None):
            mx.eval(sdpa_quantized_metal(x, scale=1.0, ring=ring, float_keys=fk, float_values=fv,
                                         mass_rows=rows, new=new, passes=passes))
