"""``Layout``: where a compressed cache keeps its tokens, per kv head:

    [ sinks | ring of codec slots | residual ]
      S fp     quantized or fp      R..R+U-1 fp

- *sinks*: the first S tokens at full precision, never evicted (attention sinks);
- *ring*: older tokens in the key/value codecs' storage (``mlxkv.cache.codec``), written U
  tokens at a time (U = the flush unit); which slots they go to, and what is evicted to
  make room, is the eviction strategy's business (``mlxkv.cache.eviction``);
- *residual*: the most recent tokens at full precision. When it reaches R + U tokens,
  its oldest U tokens are flushed into the ring.

Every array has a name (``arrays``), so a saved cache is read back by name.
"""

from __future__ import annotations

import mlx.core as mx

from .codec import encode_pair

STEP = 256  # buffers grow in steps of this many tokens


def flush_unit(key_codec, value_codec, residual: int) -> int:
    """Tokens moved from the residual into the ring at a time: a codec's block (a group of
    tokens for per-channel keys), or a group when there is a residual to flush."""
    unit = max(key_codec.block, value_codec.block)
    if unit == 1 and residual > 0:
        # Flush the residual a group at a time, not a token at a time.
        unit = max(c.group for c in (key_codec, value_codec) if c.bits is not None)
    return unit


def _grown(a: mx.array, extra: int) -> mx.array:
    """``a`` (B, H, n, D) with ``extra`` zero slots appended along the token axis."""
    return mx.concatenate([a, mx.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype)], axis=2)


class Layout:
    """The arrays and counters of sinks + ring + residual (see the module docstring)."""

    def __init__(self, *, key_codec, value_codec, sinks: int = 0, residual: int = 0):
        self.kc, self.vc = key_codec, value_codec
        self.sinks, self.residual = sinks, residual
        self.unit = flush_unit(key_codec, value_codec, residual)
        self.n_sinks = 0       # sink tokens held
        self.res_len = 0       # tokens held in the residual
        self.ring_len = 0      # slots of the ring in use
        self.alloc = 0         # ring slots allocated
        self.flushed = 0       # tokens flushed into the ring so far (incl. those since evicted)
        self.sink_keys = self.sink_values = self.residual_keys = self.residual_values = None
        self.ring_keys = self.ring_values = None  # tuples: the codecs' storage

    @property
    def empty(self) -> bool:
        return self.sink_keys is None

    def allocate(self, keys: mx.array, values: mx.array) -> None:
        """Buffers for sinks and residual shaped like ``keys``/``values`` (B, H, L, D)."""
        B, H, _, Dk = keys.shape
        Dv, dt = values.shape[3], keys.dtype
        self.sink_keys, self.sink_values = mx.zeros((B, H, self.sinks, Dk), dt), mx.zeros((B, H, self.sinks, Dv), dt)
        rcap = self.residual + self.unit
        self.residual_keys, self.residual_values = mx.zeros((B, H, rcap, Dk), dt), mx.zeros((B, H, rcap, Dv), dt)

    # ----- full-precision parts -------------------------------------------------------
    def store_sinks(self, at: int, keys: mx.array, values: mx.array) -> None:
        n = keys.shape[2]
        self.sink_keys[..., at : at + n, :] = keys
        self.sink_values[..., at : at + n, :] = values
        self.n_sinks = at + n

    def held_residual(self) -> tuple[mx.array, mx.array]:
        n = self.res_len
        return self.residual_keys[..., :n, :], self.residual_values[..., :n, :]

    def store_residual(self, keys: mx.array, values: mx.array) -> None:
        """Replace the residual's tokens with ``keys``/``values``, growing in steps."""
        n = keys.shape[2]
        if n > self.residual_keys.shape[2]:
            grow = -(-(n - self.residual_keys.shape[2]) // STEP) * STEP
            self.residual_keys = _grown(self.residual_keys, grow)
            self.residual_values = _grown(self.residual_values, grow)
        if n:
            self.residual_keys[..., :n, :] = keys
            self.residual_values[..., :n, :] = values
        self.res_len = n

    def float_part(self) -> tuple[mx.array, mx.array]:
        """Sinks then residual (B, H, n, D): the full-precision tokens held."""
        ks = [self.sink_keys[..., : self.n_sinks, :], self.residual_keys[..., : self.res_len, :]]
        vs = [self.sink_values[..., : self.n_sinks, :], self.residual_values[..., : self.res_len, :]]
        return mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)

    # ----- the ring -------------------------------------------------------------------
    def reserve_ring(self, needed: int, like_k: mx.array, like_v: mx.array,
                     limit: int | None = None) -> None:
        """At least ``needed`` ring slots (up to ``limit``), allocated in steps."""
        if needed <= self.alloc:
            return
        new = -(-needed // STEP) * STEP
        new = -(-new // self.unit) * self.unit
        if limit is not None:
            new = min(new, limit)
        B, H, _, Dk = like_k.shape
        if self.ring_keys is None:
            self.ring_keys = self.kc.alloc(B, H, new, Dk, like_k.dtype)
            self.ring_values = self.vc.alloc(B, H, new, like_v.shape[3], like_v.dtype)
        else:
            self.ring_keys = self.kc.grow(self.ring_keys, new - self.alloc)
            self.ring_values = self.vc.grow(self.ring_values, new - self.alloc)
        self.alloc = new

    def write_ring(self, slot: int, keys: mx.array, values: mx.array) -> None:
        """Encode ``keys``/``values`` (B, H, n, D) into ring slots ``slot .. slot + n``."""
        ek, ev = encode_pair(self.kc, self.vc, keys, values)
        self.kc.store(self.ring_keys, slot, ek, keys.shape[2])
        self.vc.store(self.ring_values, slot, ev, values.shape[2])

    def ring_slots(self) -> tuple[tuple, tuple]:
        """The storage of the slots in use: (key parts, value parts)."""
        n = self.ring_len
        return self.kc.slots(self.ring_keys, n), self.vc.slots(self.ring_values, n)

    def set_ring(self, keys: tuple, values: tuple, length: int) -> None:
        """Replace the ring with exactly ``length`` slots of storage."""
        self.ring_keys, self.ring_values = keys, values
        self.ring_len = self.alloc = length

    # ----- bytes and persistence ------------------------------------------------------
    def arrays(self) -> dict:
        """Every array by name (ring parts as tuples), the ring only once allocated."""
        if self.empty:
            return {}
        out = {"sink_keys": self.sink_keys, "sink_values": self.sink_values,
               "residual_keys": self.residual_keys, "residual_values": self.residual_values}
        if self.ring_keys is not None:
            out["ring_keys"], out["ring_values"] = tuple(self.ring_keys), tuple(self.ring_values)
        return out

    def set_arrays(self, arrays: dict) -> None:
        self.sink_keys, self.sink_values = arrays["sink_keys"], arrays["sink_values"]
        self.residual_keys, self.residual_values = arrays["residual_keys"], arrays["residual_values"]
        ring_k, ring_v = arrays.get("ring_keys"), arrays.get("ring_values")
        self.ring_keys = None if ring_k is None else tuple(ring_k)
        self.ring_values = None if ring_v is None else tuple(ring_v)

    def clear(self) -> None:
        self.sink_keys = self.sink_values = self.residual_keys = self.residual_values = None
        self.ring_keys = self.ring_values = None

    def v1_names(self) -> list[str]:
        """The arrays in the order mlxkv 0.1 saved them (a list, by position)."""
        return (["sink_keys", "sink_values", "residual_keys", "residual_values"]
                + [f"ring_keys.{i}" for i in range(self.kc.parts)]
                + [f"ring_values.{i}" for i in range(self.vc.parts)])

    @property
    def full_nbytes(self) -> int:
        """Bytes of the sink and residual buffers."""
        arrays = (self.sink_keys, self.sink_values, self.residual_keys, self.residual_values)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def nbytes(self) -> int:
        ring = list(self.ring_keys or ()) + list(self.ring_values or ())
        return self.full_nbytes + sum(a.nbytes for a in ring)

    def consistent(self) -> bool:
        """The counters fit inside the arrays (a check on a loaded cache)."""
        return (self.n_sinks <= self.sink_keys.shape[2] and self.res_len <= self.residual_keys.shape[2]
                and self.ring_len <= self.alloc and (self.ring_len == 0 or self.ring_keys is not None))
