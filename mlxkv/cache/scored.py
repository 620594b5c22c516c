"""``ScoredCache``: sinks + a bounded ring that evicts by a policy's scores + residual.

Like ``WindowCache`` (same budget, same layout), but when the ring is full each kv head
keeps the ``capacity`` top-scoring tokens among those it holds and those arriving
(``mlxkv.policies``: knorm, snapkv, h2o, tova, ...), except that the ``recent`` newest
tokens are always kept (heavy hitters + recent, as in H2O; without it a token just
generated, which no query has attended to yet, would be the first to go). The ring is
kept in position order per head. Keys are stored per token (eviction is per token).

Attention-based policies get their statistics from the cache's own attention: the
probabilities each observed query gives the ring slots update the slot scores, and those
it gives the tokens still in the residual (or the chunk being prefilled) accumulate until
they enter the ring. A prefill chunk attends to everything the cache holds plus itself,
and eviction happens when the chunk is stored (as in SnapKV), so chunked and
token-by-token feeding differ here, unlike with the positional window.
"""

from __future__ import annotations

import mlx.core as mx

from ..policies import Policy
from .window import WindowCache


class ScoredCache(WindowCache):
    positional = False

    def __init__(self, *, policy: Policy, recent: int = 32, **window_args):
        super().__init__(**window_args)
        self.recent = min(recent, self.capacity)  # the newest tokens are never evicted
        if self.kc.block != 1:
            raise ValueError("a scored cache stores keys per token")
        self.policy = policy
        self.slot_score = None  # (B, H, ring_len) float32
        self.slot_pos = None    # (B, H, ring_len) int32
        self._tail_mass = None  # (B, H, t): attention to the tokens not yet in the ring

    @property
    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.slot_score, self.slot_pos) if a is not None)
        return super().nbytes + extra

    def _ring_positions(self, i):
        # Every ring token precedes every query of a chunk; per-head positions differ, so
        # the causal mask gets a position below all queries instead.
        return mx.full(i.shape, self.sinks, mx.int32)

    # ----- statistics from attention --------------------------------------------------
    def _observed_rows(self, queries):
        if not self.policy.needs_attention:
            return None
        return self.policy.observed_queries(*queries)

    def _observe_mass(self, mass, queries):
        at = self.n_sinks
        if self.ring_len:
            ring = self._ring_mass(mass[..., at : at + self.ring_len])
            self.slot_score = self.policy.observe(self.slot_score, ring)
            at += self.ring_len
        tail = mass[..., at:]
        p0 = self._pending[2] if self._pending is not None else self.offset
        tail = tail[..., max(0, self.sinks - p0) :]  # drop columns of future sinks
        old = self._tail(tail.shape[-1])
        self._tail_mass = self.policy.observe(old, tail)

    def _ring_mass(self, mass: mx.array) -> mx.array:
        """The mass of the ring slots, shaped like ``slot_score``."""
        return mass

    def _tail(self, length: int) -> mx.array:
        """The accumulated tail statistics, padded with zeros to ``length`` tokens."""
        B, H = self.sink_k.shape[:2]
        if self._tail_mass is None:
            return mx.zeros((B, H, length), mx.float32)
        have = self._tail_mass.shape[-1]
        if have >= length:
            return self._tail_mass[..., :length]
        return mx.concatenate([self._tail_mass, mx.zeros((B, H, length - have), mx.float32)], -1)

    def attend(self, queries, *, scale: float, mask=None):
        out = super().attend(queries, scale=scale, mask=mask)
        if queries.shape[2] > 1 and self.policy.needs_attention:
            # A prompt chunk: settle this layer's statistics now. Left lazy until the whole
            # forward pass is evaluated, every layer's chunk attention probabilities (about
            # 19 MB a layer for 512 queries over 1k tokens on the default model) would be
            # alive at once, doubling the process for a cache of a few MB.
            mx.eval(out, [a for a in (self.slot_score, self._tail_mass) if a is not None])
        return out

    # ----- eviction -------------------------------------------------------------------
    def _write_ring(self, k, v):
        n = k.shape[2]
        pos = self.sinks + self.flushed + mx.arange(n)
        tail = self._tail(max(n, 0 if self._tail_mass is None else self._tail_mass.shape[-1]))
        score = self.policy.enter(k, pos) + tail[..., :n]
        self._tail_mass = tail[..., n:]
        B, H = k.shape[:2]
        pos = mx.broadcast_to(pos.astype(mx.int32), (B, H, n))
        new_k, new_v = self.kc.encode(k), self.vc.encode(v)
        if self.ring_len:
            new_k = tuple(mx.concatenate([a, b], axis=2)
                          for a, b in zip(self.kc.slots(self.ring_k, self.ring_len), new_k))
            new_v = tuple(mx.concatenate([a, b], axis=2)
                          for a, b in zip(self.vc.slots(self.ring_v, self.ring_len), new_v))
            score = mx.concatenate([self.slot_score, score], axis=-1)
            pos = mx.concatenate([self.slot_pos, pos], axis=-1)
        total = pos.shape[-1]
        if total > self.capacity:
            newest = self.sinks + self.flushed + n - 1
            rank = mx.where(pos > newest - self.recent, mx.inf, score)  # recent: always kept
            keep = mx.argpartition(-rank, kth=self.capacity - 1, axis=-1)[..., : self.capacity]
            keep = mx.take_along_axis(keep, mx.argsort(mx.take_along_axis(pos, keep, -1), -1), -1)
            pick = lambda a: mx.take_along_axis(  # noqa: E731
                a, mx.broadcast_to(keep[..., None], (*keep.shape, a.shape[-1])), axis=2)
            new_k, new_v = tuple(map(pick, new_k)), tuple(map(pick, new_v))
            score, pos = mx.take_along_axis(score, keep, -1), mx.take_along_axis(pos, keep, -1)
            total = self.capacity
        self.ring_k, self.ring_v = new_k, new_v
        self.slot_score, self.slot_pos = score, pos
        self._alloc = total
        self.flushed += n
        self.ring_len = total

    # ----- persistence ----------------------------------------------------------------
    @property
    def state(self):
        arrays = super().state
        if arrays and self.slot_score is not None:
            tail = self._tail(self.offset - self.sinks - self.flushed if self.offset > self.sinks else 0)
            arrays = arrays + [self.slot_score, self.slot_pos, tail]
        return arrays

    @state.setter
    def state(self, arrays):
        with_ring = 4 + self.kc.parts + self.vc.parts
        if len(arrays) == with_ring + 3:
            *arrays, self.slot_score, self.slot_pos, self._tail_mass = arrays
        WindowCache.state.fset(self, arrays)
