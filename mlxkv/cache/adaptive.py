"""``AdaptiveScoredCache``: a scored cache whose kv heads share the layer's ring (AdaKV,
Feng et al., 2024: adaptive budget allocation across heads).

A uniform allocation keeps ``capacity`` tokens in every kv head. Heads differ, though:
some attend to a few tokens, others spread out. Here the layer keeps ``H * capacity``
tokens in all, chosen by the policy's scores across all heads at once, so a head whose
attention is concentrated gives slots to one whose attention is spread; each head keeps
at least ``floor`` of ``capacity`` (AdaKV's safeguard) and its ``recent`` newest tokens.

Storage is one pool of slots per layer, (B, 1, H * capacity) in the codecs' layouts, in
(head, position) order, with each slot's head id: the same bytes as the uniform ring
(plus 4 bytes per slot), so the budget holds. Attention scores every query head against
the pool and masks the slots of other heads. Batch size 1.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import InputError
from .scored import ScoredCache

_BOOST = 1e30  # lifts a head's guaranteed picks above every score


class AdaptiveScoredCache(ScoredCache):
    def __init__(self, *, floor: float = 0.2, **scored_args):
        super().__init__(**scored_args)
        self.floor = floor
        self.slot_head = None  # (B, 1, N) int32: which kv head each pool slot belongs to
        self.heads = None

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self.slot_head is None else self.slot_head.nbytes)

    def _allocate(self, keys, values):
        if keys.shape[0] != 1:  # make_cache checks this up front; hand-made caches here
            raise InputError(f"the adaptive allocator keeps one sequence (batch size 1, got "
                             f"{keys.shape[0]})")
        super()._allocate(keys, values)

    def _ring_tokens(self) -> int:
        return self.ring_len // self.heads if self.heads else 0  # per head, on average

    def _quantized_ring(self):
        return None  # the fused kernel reads per-head rings

    def _ring_head_mask(self):
        if self.slot_head is None or not self.ring_len:
            return None
        return self.slot_head[0, 0][None, :] == mx.arange(self.heads)[:, None]

    def _ring_mass(self, mass):
        # other heads' slots got no attention (masked): the owner's mass is the sum
        return mass.sum(axis=1, keepdims=True)

    def _select(self, rank: mx.array, head: mx.array, keep: int) -> mx.array:
        """Indices (B, 1, keep) of the pool slots to keep: each head's top ``floor`` share
        first, then the best of the rest across heads."""
        guaranteed = int(self.floor * self.capacity)
        boosted = rank
        for h in range(self.heads):
            mine = head == h
            count = int(mine.sum().item())
            if not count or not guaranteed:
                continue
            r = mx.where(mine, rank, -mx.inf)
            kth = mx.sort(r, axis=-1)[..., -min(guaranteed, count)][..., None]
            boosted = mx.where(mine & (r >= kth), rank + _BOOST, boosted)
        return mx.argpartition(-boosted, kth=keep - 1, axis=-1)[..., :keep]

    def _write_ring(self, k, v):
        B, H, n, _ = k.shape
        self.heads = H
        pos = self.sinks + self.flushed + mx.arange(n)
        tail = self._tail(max(n, 0 if self._tail_mass is None else self._tail_mass.shape[-1]))
        score = (self.policy.enter(k, pos) + tail[..., :n]).reshape(B, 1, H * n)
        self._tail_mass = tail[..., n:]
        pos = mx.broadcast_to(pos.astype(mx.int32), (B, H, n)).reshape(B, 1, H * n)
        head = mx.broadcast_to(mx.arange(H, dtype=mx.int32)[:, None], (H, n)).reshape(1, 1, H * n)
        new_k = self.kc.encode(k.reshape(B, 1, H * n, -1))
        new_v = self.vc.encode(v.reshape(B, 1, H * n, -1))
        if self.ring_len:
            join = lambda a, b: mx.concatenate([a, b], axis=2)  # noqa: E731
            new_k = tuple(map(join, self.kc.slots(self.ring_k, self.ring_len), new_k))
            new_v = tuple(map(join, self.vc.slots(self.ring_v, self.ring_len), new_v))
            score = mx.concatenate([self.slot_score, score], axis=-1)
            pos = mx.concatenate([self.slot_pos, pos], axis=-1)
            head = mx.concatenate([self.slot_head, head], axis=-1)
        total = pos.shape[-1]
        pool = H * self.capacity
        if total > pool:
            newest = self.sinks + self.flushed + n - 1
            rank = mx.where(pos > newest - self.recent, mx.inf, score)
            keep = self._select(rank, head, pool)
            order = head.astype(mx.int64) * (1 << 32) + pos.astype(mx.int64)
            keep = mx.take_along_axis(keep, mx.argsort(mx.take_along_axis(order, keep, -1), -1), -1)
            pick = lambda a: mx.take_along_axis(  # noqa: E731
                a, mx.broadcast_to(keep[..., None], (*keep.shape, a.shape[-1])), axis=2)
            new_k, new_v = tuple(map(pick, new_k)), tuple(map(pick, new_v))
            score, pos, head = (mx.take_along_axis(a, keep, -1) for a in (score, pos, head))
            total = pool
        self.ring_k, self.ring_v = new_k, new_v
        self.slot_score, self.slot_pos, self.slot_head = score, pos, head
        self._alloc = total
        self.flushed += n
        self.ring_len = total

    def head_counts(self) -> list[int]:
        """Tokens each kv head keeps in the pool."""
        if self.slot_head is None:
            return []
        return [int((self.slot_head == h).sum().item()) for h in range(self.heads)]

    # ----- persistence ----------------------------------------------------------------
    @property
    def state(self):
        arrays = ScoredCache.state.fget(self)
        if arrays and self.slot_head is not None:
            arrays = arrays + [self.slot_head]
        return arrays

    @state.setter
    def state(self, arrays):
        with_ring = 4 + self.kc.parts + self.vc.parts
        if len(arrays) == with_ring + 4:
            *arrays, self.slot_head = arrays
            self.heads = arrays[0].shape[1]
        ScoredCache.state.fset(self, arrays)
