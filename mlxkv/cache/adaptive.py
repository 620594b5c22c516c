"""``AdaptiveScoredCache``: a scored cache whose kv heads share the layer's ring (AdaKV,
Feng et al., 2024: adaptive budget allocation across heads).

A uniform allocation keeps ``capacity`` tokens in every kv head. Heads differ, though:
some attend to a few tokens, others spread out. Here the layer keeps ``H * capacity``
tokens in all, chosen by the policy's scores across all heads at once, so a head whose
attention is concentrated gives slots to one whose attention is spread; each head keeps
at least ``floor`` of ``capacity`` (AdaKV's safeguard) and its ``recent`` newest tokens.

``SharedPool`` is that grouping of slots, for any scoring policy (``scored.Scored``):
one pool per layer, (B, 1, H * capacity) in the codecs' layouts, in (head, position)
order, with each slot's head id: the same bytes as the uniform ring (plus 4 bytes per
slot), so the budget holds. Attention scores every query head against the pool and masks
the slots of other heads. Batch size 1.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import InputError
from .scored import ScoredCache

_BOOST = 1e30  # lifts a head's guaranteed picks above every score


class SharedPool:
    """The kv heads of a layer share ``H * capacity`` slots; each keeps at least
    ``floor * capacity`` of them."""

    shared = True
    names = ("slot_head",)

    def __init__(self, floor: float = 0.2):
        self.floor = floor

    def check_batch(self, batch: int) -> None:
        if batch != 1:  # make_cache checks this up front; hand-made caches here
            raise InputError(f"the adaptive allocator keeps one sequence (batch size 1, got {batch})")

    def arrange(self, keys, values, score, pos):
        B, H, n, _ = keys.shape
        head = mx.broadcast_to(mx.arange(H, dtype=mx.int32)[:, None], (H, n)).reshape(1, 1, H * n)
        return (keys.reshape(B, 1, H * n, -1), values.reshape(B, 1, H * n, -1),
                score.reshape(B, 1, H * n), pos.reshape(B, 1, H * n), head)

    def slots(self, capacity: int, heads: int) -> int:
        return heads * capacity

    def select(self, rank: mx.array, head: mx.array, keep: int, capacity: int) -> mx.array:
        """Each head's top ``floor`` share first, then the best of the rest across heads:
        per head (a row each), the score its ``floor``-th best slot has; slots at or above
        their head's mark are lifted above all others."""
        guaranteed = int(self.floor * capacity)
        if guaranteed:
            heads = keep // capacity
            mine = head == mx.arange(heads, dtype=head.dtype).reshape(-1, 1, 1)  # (heads, 1, N)
            r = mx.where(mine, rank, -mx.inf)
            count = mine.sum(axis=-1, keepdims=True)
            nth = r.shape[-1] - mx.maximum(mx.minimum(count, guaranteed), 1)
            nth = mx.take_along_axis(mx.sort(r, axis=-1), nth, -1)
            lifted = (mine & (r >= nth) & (count > 0)).any(axis=0, keepdims=True)
            rank = mx.where(lifted, rank + _BOOST, rank)
        return mx.argpartition(-rank, kth=keep - 1, axis=-1)[..., :keep]

    def order(self, pos: mx.array, head: mx.array) -> mx.array:
        return head.astype(mx.int64) * (1 << 32) + pos.astype(mx.int64)

    def ring_mass(self, mass: mx.array) -> mx.array:
        # other heads' slots got no attention (masked): the owner's mass is the sum
        return mass.sum(axis=1, keepdims=True)

    def head_mask(self, head, heads: int):
        if head is None:
            return None
        return head[0, 0][None, :] == mx.arange(heads)[:, None]

    def tokens_per_head(self, ring_len: int, heads: int) -> int:
        return ring_len // heads  # on average


class AdaptiveScoredCache(ScoredCache):
    def __init__(self, *, floor: float = 0.2, **scored_args):
        super().__init__(slots=SharedPool(floor), **scored_args)

    def head_counts(self) -> list[int]:
        """Tokens each kv head keeps in the pool."""
        head = self.eviction.head
        if head is None:
            return []
        return [int((head == h).sum().item()) for h in range(self.layout.sink_keys.shape[1])]
