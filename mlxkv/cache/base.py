"""The shared machinery of mlxkv's compressed caches.

A compressed layer cache holds, per kv head:

    [ sinks | ring of codec slots | residual ]
      S fp     quantized or fp      R..R+U-1 fp

- *sinks*: the first S tokens at full precision, never evicted (attention sinks);
- *ring*: older tokens in the key/value codecs' storage, written U tokens at a time
  (U = the flush unit); unbounded (grows in steps) or bounded to ``capacity`` tokens,
  where the newest flushed tokens overwrite the oldest;
- *residual*: the most recent tokens at full precision. When it reaches R + U tokens,
  its oldest U tokens are flushed into the ring.

The cache owns attention over this storage (``attend``): keys are scored segment by
segment straight from their storage (no dequantized copy of the cache), one softmax
runs over all segments, and the values are summed back the same way. A chunk of L > 1
new tokens (chunked prefill) stays pending until its attention is done, and each query
sees exactly what it would have seen had the tokens come one at a time: the sinks plus
the tokens a bounded ring still held at its position. So chunked and token-by-token
feeding agree, and memory stays bounded by the cache plus one chunk.
"""

from __future__ import annotations

import mlx.core as mx

from ..kernels import QuantizedKV, attention_mass, metal_enabled, sdpa_quantized
from ..kernels.sdpa_quantized import fused_available
from ..stats import LayerStats, dtype_name
from .codec import AffineCodec, FloatCodec

_FLOAT = FloatCodec()


def hadamard_signs(dim: int, seed: int) -> mx.array:
    """The random ±1 diagonal of a randomized Hadamard rotation (same seed, same signs)."""
    key = mx.random.key(seed)
    return mx.where(mx.random.bernoulli(0.5, (dim,), key=key), 1.0, -1.0)


def flush_unit(key_codec, value_codec, residual: int) -> int:
    """Tokens moved from the residual into the ring at a time: a codec's block (a group of
    tokens for per-channel keys), or a group when there is a residual to flush."""
    unit = max(key_codec.block, value_codec.block)
    if unit == 1 and residual > 0:
        # Flush the residual a group at a time, not a token at a time.
        unit = max(c.group for c in (key_codec, value_codec) if c.bits is not None)
    return unit


class CompressedCache:
    """Sinks + ring + residual; see the module docstring. Subclasses choose the layout."""

    step = 256
    bounded = False
    positional = True  # a bounded ring evicts by position (else: by the policy's scores)

    def __init__(self, *, key_codec, value_codec, sinks: int = 0, residual: int = 0,
                 capacity: int | None = None, start: int = 0, rotate: bool = False,
                 seed: int = 0, budget: int | None = None):
        self.kc, self.vc = key_codec, value_codec
        self.unit = flush_unit(key_codec, value_codec, residual)
        self.budget = budget  # bytes this layer may take (None: not budgeted)
        self.sinks = sinks
        self.residual = residual
        self.capacity = capacity
        self.bounded = capacity is not None
        self.start = start
        self.rotate = rotate
        self.seed = seed
        self.offset = 0        # tokens seen
        self.flushed = 0       # tokens flushed into the ring so far (incl. those since evicted)
        self.ring_len = 0      # tokens held in the ring
        self.res_len = 0       # tokens held in the residual
        self.n_sinks = 0       # sink tokens held
        self._alloc = 0        # ring slots allocated
        self._pending = None   # (keys, values) of a chunk awaiting its attention
        self.sink_k = self.sink_v = self.res_k = self.res_v = None
        self.ring_k = self.ring_v = None
        self._signs = None

    # ----- protocol -----------------------------------------------------------------
    def empty(self) -> bool:
        return self.sink_k is None

    def size(self) -> int:
        """Tokens held per kv head."""
        return self.n_sinks + self._ring_tokens() + self.res_len

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        # ``attend`` builds its own mask from token positions.
        return None if N == 1 else "causal"

    def is_trimmable(self) -> bool:
        return not self.bounded

    def trim(self, n: int) -> int:
        """Drop the newest n tokens (unbounded caches; from the residual, then the ring
        where the key layout is per token). Returns how many were dropped."""
        self._commit()
        n = min(n, self.offset)
        take = min(n, self.res_len)
        self.res_len -= take
        rest = n - take
        if rest and self.kc.block == 1 and self.vc.block == 1 and not self.bounded:
            ring_take = min(rest, self.ring_len)
            self.ring_len -= ring_take
            self.flushed -= ring_take
            take += ring_take
        self.offset -= take
        return take

    @property
    def nbytes(self) -> int:
        arrays = [self.sink_k, self.sink_v, self.res_k, self.res_v]
        arrays += list(self.ring_k or ()) + list(self.ring_v or ())
        return sum(a.nbytes for a in arrays if a is not None)

    def _ring_tokens(self) -> int:
        """Tokens each kv head holds in the ring."""
        return self.ring_len

    def layer_stats(self) -> LayerStats:
        held_full = self.n_sinks + self.res_len
        ring_bits = self.kc.bits or self.vc.bits
        ring = self._ring_tokens()
        kept = held_full + ring
        if self.sink_k is None:
            return LayerStats(seen=self.offset, kept_full=0, kept_quantized={},
                              evicted=self.offset, nbytes=0, fp16_nbytes=0, used_nbytes=0,
                              dense_nbytes=0)
        head = self.sink_k.shape[0] * self.sink_k.shape[1] * (self.sink_k.shape[3] + self.sink_v.shape[3])
        dtype = self.sink_k.dtype
        full_bytes = sum(a.nbytes for a in (self.sink_k, self.sink_v, self.res_k, self.res_v))
        # the ring's arrays (and per-slot metadata) in use, in proportion to its filled slots
        ring_used = (self.nbytes - full_bytes) * self.ring_len // max(self._alloc, 1)
        return LayerStats(
            seen=self.offset,
            kept_full=held_full + (0 if ring_bits else ring),
            kept_quantized={ring_bits: ring} if ring_bits and ring else {},
            evicted=self.offset - kept,
            nbytes=self.nbytes,
            fp16_nbytes=2 * head * kept,
            used_nbytes=head * dtype.size * held_full + ring_used,
            dense_nbytes=head * dtype.size * kept,
            dtype=dtype_name(dtype),
        )

    # ----- writing ----------------------------------------------------------------
    def _rot(self, x):
        return mx.hadamard_transform(x * self._signs.astype(x.dtype))

    def _allocate(self, keys, values):
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        dt = keys.dtype
        self.sink_k, self.sink_v = mx.zeros((B, H, self.sinks, Dk), dt), mx.zeros((B, H, self.sinks, Dv), dt)
        rcap = self.residual + self.unit
        self.res_k, self.res_v = mx.zeros((B, H, rcap, Dk), dt), mx.zeros((B, H, rcap, Dv), dt)
        if self.rotate:
            self._signs = hadamard_signs(Dk, self.seed)

    def _grow_ring(self, needed: int, like_k, like_v):
        limit = self.capacity if self.bounded else None
        if needed <= self._alloc:
            return
        new = -(-needed // self.step) * self.step
        new = -(-new // self.unit) * self.unit
        if limit is not None:
            new = min(new, limit)
        B, H, _, Dk = like_k.shape
        if self.ring_k is None:
            self.ring_k = self.kc.alloc(B, H, new, Dk, like_k.dtype)
            self.ring_v = self.vc.alloc(B, H, new, like_v.shape[3], like_v.dtype)
        else:
            self.ring_k = self.kc.grow(self.ring_k, new - self._alloc)
            self.ring_v = self.vc.grow(self.ring_v, new - self._alloc)
        self._alloc = new

    def _write_ring(self, k, v):
        """Append n tokens (a multiple of the unit) to the ring, evicting if bounded."""
        n = k.shape[2]
        if self.bounded and n > self.capacity:
            drop = n - self.capacity
            k, v = k[..., drop:, :], v[..., drop:, :]
            self.flushed += drop
            n = self.capacity
        if not self.bounded:
            self._grow_ring(self.ring_len + n, k, v)
            self.kc.write(self.ring_k, self.ring_len, k)
            self.vc.write(self.ring_v, self.ring_len, v)
        else:
            self._grow_ring(min(self.flushed + n, self.capacity), k, v)
            at = self.flushed % self.capacity
            first = min(n, self.capacity - at)
            self.kc.write(self.ring_k, at, k[..., :first, :])
            self.vc.write(self.ring_v, at, v[..., :first, :])
            if first < n:
                self.kc.write(self.ring_k, 0, k[..., first:, :])
                self.vc.write(self.ring_v, 0, v[..., first:, :])
        self.flushed += n
        self.ring_len = min(self.flushed, self.capacity) if self.bounded else self.ring_len + n

    def _commit(self):
        """Store the pending chunk: sinks first, then residual, flushing whole units."""
        if self._pending is None:
            return
        k, v, p0 = self._pending
        self._pending = None
        n_sink = max(0, min(k.shape[2], self.sinks - p0))
        if n_sink:
            self.sink_k[..., p0 : p0 + n_sink, :] = k[..., :n_sink, :]
            self.sink_v[..., p0 : p0 + n_sink, :] = v[..., :n_sink, :]
            self.n_sinks = p0 + n_sink
            k, v = k[..., n_sink:, :], v[..., n_sink:, :]
        if k.shape[2] == 0:
            return
        if self.res_len:
            k = mx.concatenate([self.res_k[..., : self.res_len, :], k], axis=2)
            v = mx.concatenate([self.res_v[..., : self.res_len, :], v], axis=2)
        total = k.shape[2]
        n_flush = 0
        if self.offset >= self.start:
            n_flush = max(0, (total - self.residual) // self.unit * self.unit)
        if n_flush:
            self._write_ring(k[..., :n_flush, :], v[..., :n_flush, :])
        tail = total - n_flush
        if tail > self.res_k.shape[2]:
            grow = -(-(tail - self.res_k.shape[2]) // self.step) * self.step
            pad = lambda a: mx.zeros((*a.shape[:2], grow, a.shape[3]), a.dtype)  # noqa: E731
            self.res_k = mx.concatenate([self.res_k, pad(self.res_k)], axis=2)
            self.res_v = mx.concatenate([self.res_v, pad(self.res_v)], axis=2)
        if tail:
            self.res_k[..., :tail, :] = k[..., n_flush:, :]
            self.res_v[..., :tail, :] = v[..., n_flush:, :]
        self.res_len = tail

    def update_and_fetch(self, keys, values):
        """Take L new tokens. One token is stored at once; a longer chunk is stored after
        its attention (``attend``), so its queries can still see what it will evict."""
        self._commit()
        if self.sink_k is None:
            self._allocate(keys, values)
        if self.rotate:
            keys = self._rot(keys)
        self._pending = (keys, values, self.offset)
        self.offset += keys.shape[2]
        if keys.shape[2] == 1:
            self._commit()
        return keys, values

    # ----- attention --------------------------------------------------------------
    def _lowest_visible(self, pos: mx.array) -> mx.array:
        """The lowest non-sink position a query at ``pos`` sees (bounded rings)."""
        seen = pos + 1 - self.sinks
        flushed = mx.maximum(seen - self.residual, 0) // self.unit * self.unit
        if self.start:
            flushed = mx.where(pos + 1 >= self.start, flushed, 0)
        return self.sinks + mx.maximum(flushed - self.capacity, 0)

    def _ring_positions(self, i: mx.array) -> mx.array:
        """Token positions of ring slots ``i`` (the slot order a ring is written in)."""
        if self.bounded:
            last = self.flushed - 1
            return self.sinks + last - (last - i) % self.capacity
        return self.sinks + self.flushed - self.ring_len + i

    def _segments(self, dense_after: mx.array | None = None):
        """(key codec, key storage, value codec, value storage, positions) per segment.

        With ``dense_after`` the ring comes dequantized (for a chunk of queries), computed
        only once that array is: so each layer's transient copy exists while that layer
        runs, not all layers' copies at once when a whole forward pass is evaluated."""
        segs = []
        if self.n_sinks:
            segs.append((_FLOAT, (self.sink_k[..., : self.n_sinks, :],), _FLOAT,
                         (self.sink_v[..., : self.n_sinks, :],), mx.arange(self.n_sinks)))
        if self.ring_len:
            n = self.ring_len
            i = mx.arange(n)
            pos = self._ring_positions(i)
            ks, vs = self.kc.slots(self.ring_k, n), self.vc.slots(self.ring_v, n)
            if dense_after is not None:
                ks = tuple(mx.depends(list(ks), [dense_after]))
                vs = tuple(mx.depends(list(vs), [dense_after]))
                segs.append((_FLOAT, (self.kc.decode(ks),), _FLOAT, (self.vc.decode(vs),), pos))
            else:
                segs.append((self.kc, ks, self.vc, vs, pos))
        if self.res_len:
            first = self.sinks + self.flushed
            segs.append((_FLOAT, (self.res_k[..., : self.res_len, :],), _FLOAT,
                         (self.res_v[..., : self.res_len, :],),
                         first + mx.arange(self.res_len)))
        if self._pending is not None:
            k, v, p0 = self._pending
            segs.append((_FLOAT, (k,), _FLOAT, (v,), p0 + mx.arange(k.shape[2])))
        return segs

    # Score-matrix elements one block of a multi-token chunk may materialize (16 MB fp32).
    block_elements = 1 << 22

    def attend(self, queries: mx.array, *, scale: float, mask=None) -> mx.array:
        """Attention of ``queries`` (B, n_heads, L, D) over this cache -> (B, n_heads, L, Dv).

        ``mask`` from the model is not needed: the cache knows every token's position.
        One query (decode) is scored straight from the packed storage. A chunk of
        queries (prefill) dequantizes the ring once for this layer (a transient array,
        freed after the layer) and is processed in blocks of queries, so its score
        matrix stays under ``block_elements`` whatever the prompt length.
        """
        B, Hq, L, D = queries.shape
        H = self.sink_k.shape[1]
        rep = Hq // H
        q = self._rot(queries) if self.rotate else queries
        if L == 1 and metal_enabled():
            ring = self._quantized_ring()
            if ring is not None:
                fk, fv = self._float_part()
                if fused_available(ring, q, fk, fv):
                    return self._attend_fused(q, scale, ring, fk, fv)
        q = (q * scale).reshape(B, H, rep, L, D)
        segs = self._segments(dense_after=q if L > 1 else None)
        if L == 1:
            out = self._attend_block(q.reshape(B, H, rep, D), segs, None, (0, 1, 1))
            return out.reshape(B, Hq, 1, -1)
        kpos = mx.concatenate([p for *_, p in segs])[None, :]
        T = kpos.shape[1]
        step = max(1, self.block_elements // (B * H * rep * T))
        outs = []
        for i in range(0, L, step):
            qpos = self.offset - L + mx.arange(i, min(i + step, L))[:, None]
            visible = kpos <= qpos
            if self.bounded and self.positional:
                visible = visible & ((kpos < self.sinks) | (kpos >= self._lowest_visible(qpos)))
            qb = q[:, :, :, i : i + step]
            n = qb.shape[3]
            o = self._attend_block(qb.reshape(B, H, rep * n, D), segs, visible, (i, n, L))
            outs.append(o.reshape(B, H, rep, n, -1))
        self._commit()
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
        return out.reshape(B, Hq, L, -1)

    # ----- the fused Metal path (decode) ---------------------------------------------
    def _quantized_ring(self) -> QuantizedKV | None:
        """The ring as the fused kernel reads it, when both codecs are quantized."""
        kc, vc = self.kc, self.vc
        if not (isinstance(kc, AffineCodec) and isinstance(vc, AffineCodec)) or not self.ring_len:
            return None
        return QuantizedKV(keys=self.ring_k, values=self.ring_v, length=self.ring_len,
                           key_bits=kc.bits, key_group=kc.group, value_bits=vc.bits,
                           value_group=vc.group, key_mode=kc.axis)

    def _float_part(self):
        """Sinks then residual (B, H, n, D): the full-precision tokens after a decode step."""
        ks = [self.sink_k[..., : self.n_sinks, :], self.res_k[..., : self.res_len, :]]
        vs = [self.sink_v[..., : self.n_sinks, :], self.res_v[..., : self.res_len, :]]
        return mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)

    def _attend_fused(self, q, scale, ring, fk, fv):
        """One decode query over the packed ring and the float tokens in one kernel; a
        cache that learns from attention gets each token's mass from the same call."""
        rows = self._observed_rows((0, 1, 1))
        if rows is None:
            return sdpa_quantized(q, scale=scale, ring=ring, float_keys=fk, float_values=fv)
        out, scores, lse = sdpa_quantized(q, scale=scale, ring=ring, float_keys=fk,
                                          float_values=fv, stats=True)
        mass = attention_mass(scores, lse, kv_heads=fk.shape[1], rows=rows)
        nq, ns = ring.length, self.n_sinks
        # kernel order (ring, sinks, residual) -> segment order (sinks, ring, residual)
        mass = mx.concatenate([mass[..., nq : nq + ns], mass[..., :nq], mass[..., nq + ns :]], -1)
        self._observe_mass(mass, (0, 1, 1))
        return out

    def _ring_head_mask(self) -> mx.array | None:
        """(H, ring_len) bool: which ring slots each kv head may attend to, for caches
        whose heads share one pool of slots (None: each head has its own ring)."""
        return None

    def _observed_rows(self, queries: tuple[int, int, int]) -> tuple[int, int] | None:
        """Which rows of queries ``first .. first + n`` of a chunk of L (``queries`` =
        (first, n, L)) this cache learns from, as a (start, stop) range, or None. The
        base cache learns from none; scored caches ask their policy."""
        return None

    def _observe_mass(self, mass: mx.array, queries: tuple[int, int, int]) -> None:
        """Attention mass (B, H, T) the observed rows gave each held token, summed over
        rows and the query heads of each kv head, in segment order (sinks, ring,
        residual, chunk)."""

    def _observe(self, probs: mx.array, queries: tuple[int, int, int]) -> None:
        """Attention probabilities (B, H, rep * n, T) of a block of queries."""
        rows = self._observed_rows(queries)
        if rows is None:
            return
        n = queries[1]
        B, H, M, T = probs.shape
        p = probs.reshape(B, H, M // n, n, T)[:, :, :, rows[0] : rows[1]]
        self._observe_mass(p.sum(axis=(2, 3)), queries)

    def _attend_block(self, q, segs, visible, queries):
        """q (B, H, M, D), M = rep * n rows; visible (n, T) or None."""
        parts = [kc.scores(q, ks) for kc, ks, _, _, _ in segs]
        scores = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        heads = self._ring_head_mask()
        if heads is not None:
            H, T = heads.shape[0], scores.shape[-1]
            rest = T - self.n_sinks - heads.shape[1]
            mask = mx.concatenate([mx.ones((H, self.n_sinks), mx.bool_), heads,
                                   mx.ones((H, rest), mx.bool_)], axis=1)
            scores = mx.where(mask[None, :, None, :], scores, mx.finfo(scores.dtype).min)
        if visible is not None:
            B, H, M, T = scores.shape
            n = visible.shape[0]
            scores = mx.where(visible, scores.reshape(B, H, M // n, n, T),
                              mx.finfo(scores.dtype).min).reshape(B, H, M, T)
        probs = mx.softmax(scores.astype(mx.float32), axis=-1, precise=True)
        self._observe(probs, queries)
        probs = probs.astype(q.dtype)
        out, at = None, 0
        for _, _, vc, vs, pos in segs:
            n = pos.shape[0]
            part = vc.weighted(probs[..., at : at + n] if len(segs) > 1 else probs, vs)
            out = part if out is None else out + part
            at += n
        return out

    # ----- persistence --------------------------------------------------------------
    _COUNTERS = ("offset", "flushed", "ring_len", "res_len", "n_sinks", "_alloc")

    @property
    def state(self):
        """The cache's arrays: sinks, residual, then the key and value ring storage."""
        self._commit()
        if self.sink_k is None:
            return []
        return [self.sink_k, self.sink_v, self.res_k, self.res_v,
                *(self.ring_k or ()), *(self.ring_v or ())]

    @state.setter
    def state(self, arrays):
        self._pending = None
        if not arrays:
            self.sink_k = self.sink_v = self.res_k = self.res_v = self.ring_k = self.ring_v = None
            return
        self.sink_k, self.sink_v, self.res_k, self.res_v, *ring = arrays
        half = len(ring) // 2
        self.ring_k = tuple(ring[:half]) or None
        self.ring_v = tuple(ring[half:]) or None
        if self.rotate:
            self._signs = hadamard_signs(self.sink_k.shape[3], self.seed)

    @property
    def meta_state(self):
        return tuple(str(getattr(self, name)) for name in self._COUNTERS)

    @meta_state.setter
    def meta_state(self, values):
        for name, value in zip(self._COUNTERS, values):
            setattr(self, name, int(value))

    def dequantized(self):
        """(keys, values) of every held token at full precision, in position order
        (for tests and references; attention never builds this)."""
        self._commit()
        ks, vs, ps = [], [], []
        for kc, kst, vc, vst, pos in self._segments():
            ks.append(kc.decode(kst))
            vs.append(vc.decode(vst))
            ps.append(pos)
        order = mx.argsort(mx.concatenate(ps))
        k = mx.take(mx.concatenate(ks, axis=2), order, axis=2)
        v = mx.take(mx.concatenate(vs, axis=2), order, axis=2)
        return k, v


def make_codec(bits: int | None, group_size: int, axis: str = "token"):
    return _FLOAT if bits is None else AffineCodec(bits=bits, group=group_size, axis=axis)
