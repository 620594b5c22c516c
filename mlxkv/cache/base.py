"""``CompressedCache``: a layer's KV cache composed of three parts.

- a ``Layout`` (``layout.py``): sinks, a ring of codec slots, an optional middle of
  more bits (bits by token age) and a full-precision residual of recent tokens, with
  named arrays;
- an eviction strategy (``eviction.py``, ``scored.py``, ``adaptive.py``): which ring slots
  flushed tokens take and what is evicted to make room;
- attention over the cache's ``Segment``s (``segments.py``), or the fused Metal kernel for
  a decode step (``fused.py``, whose ``decode`` is the one place that decides).

The cache itself does the bookkeeping between them: new tokens go to the sinks, then the
residual; whole flush units leave the residual for the middle and the ring. A chunk of
L > 1 new tokens (chunked prefill) stays pending until its attention is done, and each
query sees what it would have seen had the tokens come one at a time (a positional ring's
``rule``), so memory stays bounded by the cache plus one chunk. Keys may be rotated by a
randomized Hadamard transform (queries get the same rotation, so scores are unchanged).

The cache classes users make (``QuantizedCache``, ``WindowCache``, ``ScoredCache``,
``AdaptiveScoredCache``) only choose the parts.
"""

from __future__ import annotations

import mlx.core as mx

from ..stats import LayerStats
from .eviction import Eviction
from . import fused, measure
from .layout import Layout
from .rotation import hadamard_signs, rotate
from .segments import Segment, attend_segments, dense, held, visibility


class CompressedCache:
    """A ``Layout`` + an ``Eviction`` strategy; see the module docstring."""

    # Score-matrix elements one block of a multi-token chunk may materialize (16 MB fp32).
    block_elements = 1 << 22
    _COUNTERS = ("flushed", "ring_len", "res_len", "n_sinks", "alloc", "mid_len")  # the layout's

    def __init__(self, *, layout: Layout, eviction: Eviction, start: int = 0,
                 rotate: bool = False, seed: int = 0, budget: int | None = None):
        self.layout, self.eviction = layout, eviction
        self.budget = budget  # bytes this layer may take (None: not budgeted)
        self.start = start    # tokens seen before the ring is written
        self.rotate, self.seed = rotate, seed
        self.offset = 0       # tokens seen
        self._pending = None  # (keys, values, first position) of a chunk awaiting attention
        self._step = None     # the decode step's ``fused.DecodeStep``, made once per step
        self._signs = None

    # ----- protocol -----------------------------------------------------------------
    @property
    def bounded(self) -> bool:
        return self.eviction.bounded

    def empty(self) -> bool:
        return self.layout.empty

    def size(self) -> int:
        """Tokens held per kv head."""
        lay = self.layout
        return lay.n_sinks + self.eviction.tokens_per_head(lay) + lay.mid_len + lay.res_len

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        # ``attend`` builds its own mask from token positions.
        return None if N == 1 else "causal"

    def is_trimmable(self) -> bool:
        return not self.bounded

    def trim(self, n: int) -> int:
        """Drop the newest n tokens (unbounded caches; from the residual, the middle, then
        the ring where the key layout is per token). Returns how many were dropped."""
        self._commit()
        lay = self.layout
        n = min(n, self.offset)
        take = min(n, lay.res_len)
        lay.res_len -= take
        if n > take and not self.bounded:
            mid_take = min(n - take, lay.mid_len)
            lay.mid_len -= mid_take
            take += mid_take
        rest = n - take
        if rest and lay.kc.block == 1 and lay.vc.block == 1 and not self.bounded:
            ring_take = min(rest, lay.ring_len)
            lay.ring_len -= ring_take
            lay.flushed -= ring_take
            take += ring_take
        self.offset -= take
        return take

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes + self.eviction.nbytes

    def layer_stats(self) -> LayerStats:
        return measure.layer_stats(self)

    # ----- writing ----------------------------------------------------------------
    def _rot(self, x):
        return rotate(x, self._signs)

    def update_and_fetch(self, keys, values):
        """Take L new tokens. One token (a decode step) gets the step's decision
        (``fused.decide``: the fused kernel or segments, and whether the kernel stores the
        token in its attention's launch); it is stored at once unless the kernel will. A
        longer chunk is stored after its attention (``attend``), so its queries can still
        see what it will evict."""
        self._commit()
        if self.layout.empty:
            self.eviction.check_batch(keys.shape[0])
            self.layout.allocate(keys, values)
            if self.rotate:
                self._signs = hadamard_signs(keys.shape[3], self.seed)
        if self.rotate:
            keys = self._rot(keys)
        self._pending = (keys, values, self.offset)
        self.offset += keys.shape[2]
        if keys.shape[2] == 1:
            step = self._decide()
            if step.new is None:
                self._commit()
            self._step = step
        return keys, values

    def _commit(self):
        """Store the pending chunk: sinks first, then residual, flushing whole units."""
        if self._pending is None:
            return
        k, v, p0 = self._pending
        self._pending = self._step = None  # a step's decision about it is void once stored
        lay = self.layout
        n_sink = max(0, min(k.shape[2], lay.sinks - p0))
        if n_sink:
            lay.store_sinks(p0, k[..., :n_sink, :], v[..., :n_sink, :])
            k, v = k[..., n_sink:, :], v[..., n_sink:, :]
        if k.shape[2] == 0:
            return
        if lay.res_len:
            rk, rv = lay.held_residual()
            k, v = mx.concatenate([rk, k], axis=2), mx.concatenate([rv, v], axis=2)
        n_flush = 0
        if self.offset >= self.start:
            n_flush = max(0, (k.shape[2] - lay.residual) // lay.unit * lay.unit)
        if n_flush:
            k_ring, v_ring = lay.pass_middle(k[..., :n_flush, :], v[..., :n_flush, :])
            if k_ring.shape[2]:
                self.eviction.write(lay, k_ring, v_ring)
        lay.store_residual(k[..., n_flush:, :], v[..., n_flush:, :])

    # ----- attention --------------------------------------------------------------
    def segments(self, dense_after: mx.array | None = None) -> list[Segment]:
        """The held tokens as segments (``segments.held``)."""
        return held(self.layout, self.eviction, self._pending, dense_after)

    def attend(self, queries: mx.array, *, scale: float, mask=None) -> mx.array:
        """Attention of ``queries`` (B, n_heads, L, D) over this cache -> (B, n_heads, L, Dv).

        ``mask`` from the model is not needed: the cache knows every token's position.
        One query (decode) runs the fused Metal kernel where the step's decision says so
        (``fused.decide``, made in ``update_and_fetch``), else is scored straight from the
        packed storage. A chunk of queries (prefill)
        dequantizes the ring once for this layer (a transient array, freed after the
        layer) and is processed in blocks of queries, so its score matrix stays under
        ``block_elements`` whatever the prompt length.
        """
        B, Hq, L, D = queries.shape
        H = self.layout.sink_keys.shape[1]
        rep = Hq // H
        q = self._rot(queries) if self.rotate else queries
        if L == 1:
            step, self._step = self._step or self._decide(), None
            done = fused.decode(self.layout, self.eviction, q, scale, step) if step.fused else None
            if done is not None:
                if step.new is not None:
                    self._pending = None  # stored by the kernel's launch
                out, mass = done
                if mass is not None:
                    self._observe_mass(mass)
                return out
            self._commit()
        q = (q * scale).reshape(B, H, rep, L, D)
        segs = self.segments(dense_after=q if L > 1 else None)
        if L == 1:
            out = attend_segments(q.reshape(B, H, rep, D), segs, None, self._observer((0, 1, 1)))
            return out.reshape(B, Hq, 1, -1)
        T = sum(s.length for s in segs)
        step = max(1, self.block_elements // (B * H * rep * T))
        rule = self.eviction.rule(self.layout)
        outs = []
        for i in range(0, L, step):
            qpos = self.offset - L + mx.arange(i, min(i + step, L))[:, None]
            qb = q[:, :, :, i : i + step]
            n = qb.shape[3]
            o = attend_segments(qb.reshape(B, H, rep * n, D), segs, visibility(segs, qpos, rule),
                                self._observer((i, n, L)))
            outs.append(o.reshape(B, H, rep, n, -1))
        self._commit()
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
        statistics = self.eviction.statistics()
        if statistics:
            # A prompt chunk: settle this layer's statistics now. Left lazy until the whole
            # forward pass is evaluated, every layer's chunk attention probabilities (about
            # 19 MB a layer for 512 queries over 1k tokens on the default model) would be
            # alive at once, doubling the process for a cache of a few MB.
            mx.eval(out, statistics)
        return out.reshape(B, Hq, L, -1)

    def _decide(self) -> "fused.DecodeStep":
        """The decode step's decision, for the pending token (if any): it goes straight into
        the ring when storing it would put it there (past the sinks, no residual or middle,
        the ring started)."""
        straight = None
        if self._pending is not None:
            k, v, p0 = self._pending
            lay = self.layout
            if (k.shape[2] == 1 and p0 >= lay.sinks and self.offset >= self.start
                    and lay.straight_to_ring()):
                straight = (k, v)
        return fused.decide(self.layout, self.eviction, straight)

    # ----- learning from attention --------------------------------------------------
    def _observer(self, queries: tuple[int, int, int]):
        """What to do with the probabilities (B, H, rep * n, T) of queries
        ``first .. first + n`` of a chunk of L (``queries``): hand the mass of the rows the
        eviction strategy observes to it, or nothing (None)."""
        rows = self.eviction.observed_rows(queries)
        if rows is None:
            return None
        n = queries[1]

        def observe(probs):
            B, H, M, T = probs.shape
            p = probs.reshape(B, H, M // n, n, T)[:, :, :, rows[0] : rows[1]]
            self._observe_mass(p.sum(axis=(2, 3)))

        return observe

    def _observe_mass(self, mass: mx.array) -> None:
        first = self._pending[2] if self._pending is not None else self.offset
        self.eviction.observe(self.layout, mass, first)

    # ----- persistence --------------------------------------------------------------
    @property
    def state(self) -> dict:
        """The cache's arrays by name: the layout's, then the eviction strategy's."""
        self._commit()
        if self.layout.empty:
            return {}
        return {**self.layout.arrays(), **self.eviction.arrays(self.layout, self.offset)}

    @state.setter
    def state(self, arrays: dict):
        self._pending = self._step = None
        if not arrays:
            self.layout.clear()
            return
        self.layout.set_arrays(arrays)
        self.eviction.set_arrays(arrays)
        if self.rotate:
            self._signs = hadamard_signs(self.layout.sink_keys.shape[3], self.seed)

    @property
    def meta_state(self):
        return (str(self.offset), *(str(getattr(self.layout, n)) for n in self._COUNTERS))

    @meta_state.setter
    def meta_state(self, values):
        self.offset = int(values[0])
        for name, value in zip(self._COUNTERS, values[1:]):
            setattr(self.layout, name, int(value))

    def dequantized(self):
        """(keys, values) of every held token at full precision, in position order
        (for tests and references; attention never builds this)."""
        self._commit()
        return dense(self.segments())
