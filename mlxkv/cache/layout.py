"""``Layout``: where a compressed cache keeps its tokens, per kv head:

    [ sinks | ring of codec slots | middle        | residual ]
      S fp     quantized or fp      M, more bits    R..R+U-1 fp

- *sinks*: the first S tokens at full precision, never evicted (attention sinks);
- *ring*: older tokens in the key/value codecs' storage (``mlxkv.cache.codec``), written U
  tokens at a time (U = the flush unit); which slots they go to, and what is evicted to
  make room, is the eviction strategy's business (``mlxkv.cache.eviction``);
- *middle* (optional, bits by token age): the M tokens before the residual in codecs of
  their own with more bits than the ring's (e.g. a 4-bit middle before a 2-bit ring). The
  residual's flushed tokens enter it; when it reaches M + V tokens (V = its own flush
  unit, a group), its oldest whole units leave for the ring, decoded and coded again in
  the ring's codecs. Kept in position order, in a buffer of M + V slots written in place.
- *residual*: the most recent tokens at full precision. When it reaches R + U tokens,
  its oldest U tokens are flushed into the middle, or the ring when there is none.

Tokens flushed from the residual pass through the middle whatever the chunk size, so a
prompt fed in chunks and token by token are stored alike.

Every array has a name (``arrays``), so a saved cache is read back by name.
"""

from __future__ import annotations

import mlx.core as mx

from .codec import FLOAT, encode_pair, make_codec

STEP = 256  # buffers grow in steps of this many tokens


def flush_unit(key_codec, value_codec, residual: int) -> int:
    """Tokens moved from the residual into the ring (or middle) at a time: a codec's block
    (a group of tokens for per-channel keys), or a group when there is a residual to
    flush."""
    unit = max(key_codec.block, value_codec.block)
    if unit == 1 and residual > 0:
        # Flush the residual a group at a time, not a token at a time.
        unit = max(c.group for c in (key_codec, value_codec) if c.bits is not None)
    return unit


def middle_unit(unit: int, middle_codecs: tuple) -> int:
    """Tokens moved from the middle into the ring at a time: whole groups of its codecs
    (not a token per step: each move decodes and codes again), and whole units of the
    ring's."""
    group = max(c.group for c in middle_codecs if c.bits is not None)
    return max(unit, group)


def _grown(a: mx.array, extra: int) -> mx.array:
    """``a`` (B, H, n, D) with ``extra`` zero slots appended along the token axis."""
    return mx.concatenate([a, mx.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype)], axis=2)


def make_layout(*, key_bits: int | None, value_bits: int | None, group_size: int = 64,
                key_mode: str = "token", residual: int = 0, sinks: int = 0, quant: str = "affine",
                sketch: bool = False, outliers: int = 0, middle: int = 0,
                middle_bits: int = 4) -> "Layout":
    """The layout of a cache's settings: the ring's codecs (``codec.make_codec``) and, with
    ``middle`` tokens, a middle of ``middle_bits`` per token in the same kind of codec
    (full precision where the ring is)."""
    kc = make_codec(key_bits, group_size, key_mode, quant, sketch, outliers)
    vc = make_codec(value_bits, group_size, "token", quant)
    mid = tuple(FLOAT if c.bits is None else make_codec(middle_bits, group_size, "token", quant)
                for c in (kc, vc)) if middle else ()
    return Layout(key_codec=kc, value_codec=vc, sinks=sinks, residual=residual,
                  middle=middle, middle_codecs=mid)


class Layout:
    """The arrays and counters of sinks + ring + residual (see the module docstring)."""

    def __init__(self, *, key_codec, value_codec, sinks: int = 0, residual: int = 0,
                 middle: int = 0, middle_codecs: tuple = ()):
        self.kc, self.vc = key_codec, value_codec
        self.mkc, self.mvc = middle_codecs if middle else (None, None)
        self.sinks, self.residual = sinks, residual
        self.unit = flush_unit(key_codec, value_codec, residual)
        self.middle = middle
        self.middle_unit = middle_unit(self.unit, middle_codecs) if middle else 0
        self.n_sinks = 0       # sink tokens held
        self.res_len = 0       # tokens held in the residual
        self.mid_len = 0       # tokens held in the middle
        self.ring_len = 0      # slots of the ring in use
        self.alloc = 0         # ring slots allocated
        self.flushed = 0       # tokens flushed into the ring so far (incl. those since evicted)
        self.sink_keys = self.sink_values = self.residual_keys = self.residual_values = None
        self.ring_keys = self.ring_values = None  # tuples: the codecs' storage
        self.middle_keys = self.middle_values = None  # tuples: the middle codecs' storage

    @property
    def middle_bits(self) -> int | None:
        """Bits of the middle's quantized side (None: no middle)."""
        return (self.mkc.bits or self.mvc.bits) if self.middle else None

    @property
    def middle_capacity(self) -> int:
        """Slots of the middle's buffer: ``middle`` and one unit it flushes (0: none)."""
        return self.middle + self.middle_unit

    @property
    def held_back(self) -> int:
        """Tokens the residual and the middle keep from the ring (at least, once filled)."""
        return self.residual + self.middle

    def ring_flushed(self, seen):
        """Tokens (after the sinks) moved into the ring once ``seen`` tokens (after the
        sinks; an int or an array) have come: what the residual flushed, less what the
        middle holds."""
        flushed = mx.maximum(seen - self.residual, 0) // self.unit * self.unit
        if self.middle:
            flushed = mx.maximum(flushed - self.middle, 0) // self.middle_unit * self.middle_unit
        return flushed

    @property
    def empty(self) -> bool:
        return self.sink_keys is None

    def allocate(self, keys: mx.array, values: mx.array) -> None:
        """Buffers for sinks and residual shaped like ``keys``/``values`` (B, H, L, D)."""
        B, H, _, Dk = keys.shape
        Dv, dt = values.shape[3], keys.dtype
        self.sink_keys, self.sink_values = mx.zeros((B, H, self.sinks, Dk), dt), mx.zeros((B, H, self.sinks, Dv), dt)
        rcap = self.residual + self.unit - 1  # the most it holds between steps
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

    def sink_part(self) -> tuple[mx.array, mx.array]:
        """The sinks held (B, H, n, D): slices of their buffers."""
        n = self.n_sinks
        return self.sink_keys[..., :n, :], self.sink_values[..., :n, :]

    def straight_to_ring(self) -> bool:
        """Whether a decode step's token, past the sinks, goes straight into the ring
        (no residual or middle in between, a flush unit of one token: so keys are stored
        per token)."""
        return not (self.residual or self.middle) and self.unit == 1

    # ----- the middle -----------------------------------------------------------------
    def pass_middle(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Tokens flushed from the residual (B, H, n, D) in, the tokens the ring takes
        out: with a middle, its oldest beyond ``middle`` tokens, decoded (possibly none);
        without one, ``keys``/``values`` themselves."""
        if not self.middle:
            return keys, values
        n = keys.shape[2]
        ek, ev = encode_pair(self.mkc, self.mvc, keys, values)
        total = self.mid_len + n
        if self.middle_keys is None:
            self._new_middle(keys, values)
        if total < self.middle_capacity:  # room: written in place
            self.mkc.store(self.middle_keys, self.mid_len, ek, n)
            self.mvc.store(self.middle_values, self.mid_len, ev, n)
            self.mid_len = total
            return keys[..., :0, :], values[..., :0, :]
        # the oldest whole units beyond ``middle`` leave; the rest goes to a new buffer
        out = (total - self.middle) // self.middle_unit * self.middle_unit
        join = lambda a, b: mx.concatenate([a, b], axis=2)  # noqa: E731
        ek = tuple(map(join, self.mkc.slots(self.middle_keys, self.mid_len), ek))
        ev = tuple(map(join, self.mvc.slots(self.middle_values, self.mid_len), ev))
        leaving = (self.mkc.decode(tuple(a[..., :out, :] for a in ek)).astype(keys.dtype),
                   self.mvc.decode(tuple(a[..., :out, :] for a in ev)).astype(values.dtype))
        self._new_middle(keys, values)
        self.mid_len = total - out
        self.mkc.store(self.middle_keys, 0, tuple(a[..., out:, :] for a in ek), self.mid_len)
        self.mvc.store(self.middle_values, 0, tuple(a[..., out:, :] for a in ev), self.mid_len)
        return leaving

    def _new_middle(self, like_k: mx.array, like_v: mx.array) -> None:
        """An empty middle buffer of ``middle_capacity`` slots."""
        B, H, _, Dk = like_k.shape
        cap = self.middle_capacity
        self.middle_keys = self.mkc.alloc(B, H, cap, Dk, like_k.dtype)
        self.middle_values = self.mvc.alloc(B, H, cap, like_v.shape[3], like_v.dtype)

    def middle_slots(self) -> tuple[tuple, tuple]:
        n = self.mid_len
        return self.mkc.slots(self.middle_keys, n), self.mvc.slots(self.middle_values, n)

    @property
    def middle_nbytes(self) -> int:
        parts = list(self.middle_keys or ()) + list(self.middle_values or ())
        return sum(a.nbytes for a in parts)

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
        self.store_ring(slot, *encode_pair(self.kc, self.vc, keys, values), keys.shape[2])

    def store_ring(self, slot: int, keys: tuple, values: tuple, n: int) -> None:
        """Put n tokens' storage (already in the ring's codecs) into slots ``slot ..``."""
        self.kc.store(self.ring_keys, slot, keys, n)
        self.vc.store(self.ring_values, slot, values, n)

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
        if self.middle_keys is not None:
            out["middle_keys"], out["middle_values"] = tuple(self.middle_keys), tuple(self.middle_values)
        return out

    def set_arrays(self, arrays: dict) -> None:
        self.sink_keys, self.sink_values = arrays["sink_keys"], arrays["sink_values"]
        self.residual_keys, self.residual_values = arrays["residual_keys"], arrays["residual_values"]
        ring_k, ring_v = arrays.get("ring_keys"), arrays.get("ring_values")
        self.ring_keys = None if ring_k is None else tuple(ring_k)
        self.ring_values = None if ring_v is None else tuple(ring_v)
        mid_k, mid_v = arrays.get("middle_keys"), arrays.get("middle_values")
        self.middle_keys = None if mid_k is None else tuple(mid_k)
        self.middle_values = None if mid_v is None else tuple(mid_v)

    def clear(self) -> None:
        self.sink_keys = self.sink_values = self.residual_keys = self.residual_values = None
        self.ring_keys = self.ring_values = None
        self.middle_keys = self.middle_values = None

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
        return self.full_nbytes + self.middle_nbytes + sum(a.nbytes for a in ring)

    def consistent(self) -> bool:
        """The counters fit inside the arrays (a check on a loaded cache)."""
        return (self.n_sinks <= self.sink_keys.shape[2] and self.res_len <= self.residual_keys.shape[2]
                and self.ring_len <= self.alloc and (self.ring_len == 0 or self.ring_keys is not None)
                and self.mid_len < max(self.middle_capacity, 1)
                and (self.mid_len == 0 or self.middle_keys is not None))
