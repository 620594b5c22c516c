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

How slots are grouped is a part of its own: ``PerHead`` here (each kv head its own
``capacity`` slots), or a pool shared by a layer's heads (``adaptive.SharedPool``, AdaKV).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from ..policies import Policy
from .codec import encode_pair
from .eviction import Eviction, Placement
from .layout import Layout
from .window import WindowCache


class _Admission(NamedTuple):
    """Tokens entering a scored ring (as slots) and what stays: the held then entering
    slots' score/pos/head, the tail statistics left, and the indices that stay, in ring
    order (None: all)."""
    keys: mx.array
    values: mx.array
    n: int
    score: mx.array
    pos: mx.array
    head: mx.array | None
    tail: mx.array
    keep: mx.array | None


class PerHead:
    """Each kv head keeps its own ``capacity`` slots, in position order."""

    shared = False
    names = ()  # arrays of its own (none)

    def check_batch(self, batch: int) -> None:
        pass

    def arrange(self, keys, values, score, pos):
        """Entering tokens as slots: (keys, values, score, pos, head ids or None)."""
        return keys, values, score, pos, None

    def slots(self, capacity: int, heads: int) -> int:
        return capacity

    def select(self, rank: mx.array, head, keep: int, capacity: int) -> mx.array:
        """Indices of the ``keep`` slots to keep (in any order)."""
        return mx.argpartition(-rank, kth=keep - 1, axis=-1)[..., :keep]

    def order(self, pos: mx.array, head) -> mx.array:
        """The key kept slots are sorted by."""
        return pos

    def ring_mass(self, mass: mx.array) -> mx.array:
        """The attention mass of the ring slots, shaped like the slot scores."""
        return mass

    def head_mask(self, head, heads: int):
        return None

    def tokens_per_head(self, ring_len: int, heads: int) -> int:
        return ring_len


class Scored(Eviction):
    """Keep the top-scoring tokens by ``policy`` (and the ``recent`` newest), in slots
    grouped by ``slots`` (``PerHead`` or a shared pool)."""

    bounded = True

    def __init__(self, policy: Policy, capacity: int, recent: int, slots=None):
        self.policy, self.capacity = policy, capacity
        self.recent = min(recent, capacity)  # the newest tokens are never evicted
        self.slots = slots or PerHead()
        self.shared_slots = self.slots.shared
        self.score = None  # (B, H, ring_len) float32 (B, 1, N for a shared pool)
        self.pos = None    # int32, like score
        self.head = None   # int32, like score: each slot's kv head (shared pool only)
        self.tail = None   # (B, H, t): attention to the tokens not yet in the ring

    def check_batch(self, batch: int) -> None:
        self.slots.check_batch(batch)

    def _tail(self, B: int, H: int, length: int) -> mx.array:
        """The accumulated tail statistics, padded with zeros to ``length`` tokens."""
        if self.tail is None:
            return mx.zeros((B, H, length), mx.float32)
        have = self.tail.shape[-1]
        if have >= length:
            return self.tail[..., :length]
        return mx.concatenate([self.tail, mx.zeros((B, H, length - have), mx.float32)], -1)

    def _admit(self, layout: Layout, keys: mx.array, values: mx.array) -> _Admission:
        """Tokens entering the ring, scored, and which of the held and entering slots
        stay (nothing changes yet)."""
        B, H, n, _ = keys.shape
        pos = layout.sinks + layout.flushed + mx.arange(n)
        tail = self._tail(B, H, max(n, 0 if self.tail is None else self.tail.shape[-1]))
        score = self.policy.enter(keys, pos) + tail[..., :n]
        pos = mx.broadcast_to(pos.astype(mx.int32), (B, H, n))
        keys, values, score, pos, head = self.slots.arrange(keys, values, score, pos)
        if layout.ring_len:
            score = mx.concatenate([self.score, score], axis=-1)
            pos = mx.concatenate([self.pos, pos], axis=-1)
            head = None if head is None else mx.concatenate([self.head, head], axis=-1)
        keep = None
        room = self.slots.slots(self.capacity, H)
        if pos.shape[-1] > room:
            newest = layout.sinks + layout.flushed + n - 1
            rank = mx.where(pos > newest - self.recent, mx.inf, score)  # recent: always kept
            keep = self.slots.select(rank, head, room, self.capacity)
            order = self.slots.order(pos, head)
            keep = mx.take_along_axis(keep, mx.argsort(mx.take_along_axis(order, keep, -1), -1), -1)
        return _Admission(keys, values, n, score, pos, head, tail[..., n:], keep)

    def _store(self, layout: Layout, a: _Admission, new_k: tuple, new_v: tuple) -> None:
        """Write the admission ``a`` with the entering tokens' storage ``new_k``/``new_v``."""
        if layout.ring_len:
            join = lambda x, y: mx.concatenate([x, y], axis=2)  # noqa: E731
            held_k, held_v = layout.ring_slots()
            new_k, new_v = tuple(map(join, held_k, new_k)), tuple(map(join, held_v, new_v))
        score, pos, head = a.score, a.pos, a.head
        if a.keep is not None:
            keep = a.keep
            pick = lambda x: mx.take_along_axis(  # noqa: E731
                x, mx.broadcast_to(keep[..., None], (*keep.shape, x.shape[-1])), axis=2)
            new_k, new_v = tuple(map(pick, new_k)), tuple(map(pick, new_v))
            score, pos = mx.take_along_axis(score, keep, -1), mx.take_along_axis(pos, keep, -1)
            head = None if head is None else mx.take_along_axis(head, keep, -1)
        layout.set_ring(new_k, new_v, pos.shape[-1])
        self.score, self.pos, self.head, self.tail = score, pos, head, a.tail
        layout.flushed += a.n

    def write(self, layout: Layout, keys: mx.array, values: mx.array) -> None:
        a = self._admit(layout, keys, values)
        self._store(layout, a, *encode_pair(layout.kc, layout.vc, a.keys, a.values))

    def place(self, layout, keys, values):
        """Per-head slots with a ring already: the new token (always among the ``recent``
        kept) goes after the held slots, or, once the ring is full, takes the one slot
        the policy evicts (the held slot missing from what stays)."""
        if self.shared_slots or not layout.ring_len or self.recent < 1:
            return None
        a = self._admit(layout, keys, values)
        held = layout.ring_len
        if a.keep is None:
            return Placement(mx.full(keys.shape[:2], held, mx.int32), held + 1,
                             lambda k, v: self._store(layout, a, k, v))
        stays = mx.put_along_axis(mx.zeros(a.pos.shape, mx.int32), a.keep,
                                  mx.array(1, mx.int32), axis=-1)
        slot = mx.argmin(stays[..., :held], axis=-1).astype(mx.int32)

        def ring_order(mass):  # held-slot order, the new token in `slot` -> the kept order
            joined = mx.concatenate([mass, mx.take_along_axis(mass, slot[..., None], -1)], -1)
            return mx.take_along_axis(joined, a.keep, -1)

        return Placement(slot, held, lambda k, v: self._store(layout, a, k, v), ring_order)

    def positions(self, layout):
        return None  # per head (``pos``), each head's slots in position order

    def heads(self, layout):
        return self.slots.head_mask(self.head, layout.sink_keys.shape[1])

    def tokens_per_head(self, layout):
        return 0 if layout.empty else self.slots.tokens_per_head(layout.ring_len, layout.sink_keys.shape[1])

    # ----- statistics from attention --------------------------------------------------
    def observed_rows(self, queries):
        if not self.policy.needs_attention:
            return None
        return self.policy.observed_queries(*queries)

    def observe(self, layout, mass, first):
        at = layout.n_sinks
        if layout.ring_len:
            ring = self.slots.ring_mass(mass[..., at : at + layout.ring_len])
            self.score = self.policy.observe(self.score, ring)
            at += layout.ring_len
        tail = mass[..., at:]
        tail = tail[..., max(0, layout.sinks - first) :]  # drop columns of future sinks
        self.tail = self.policy.observe(self._tail(*mass.shape[:2], tail.shape[-1]), tail)

    def statistics(self) -> list[mx.array]:
        """What attention has taught it so far (to evaluate after a prompt chunk)."""
        if not self.policy.needs_attention:
            return []
        return [a for a in (self.score, self.tail) if a is not None]

    # ----- persistence ----------------------------------------------------------------
    def arrays(self, layout, offset):
        """The slots' statistics once the ring is written, and the tail's as held (those
        of tokens still in the middle or residual; ``_tail`` pads what is missing)."""
        out = {} if self.tail is None else {"tail": self.tail}
        if self.score is None:
            return out
        out.update(slot_score=self.score, slot_pos=self.pos)
        if self.head is not None:
            out["slot_head"] = self.head
        return out

    def set_arrays(self, arrays):
        self.score, self.pos = arrays.get("slot_score"), arrays.get("slot_pos")
        self.tail, self.head = arrays.get("tail"), arrays.get("slot_head")

    def v1_names(self):
        return ["slot_score", "slot_pos", "tail", *self.slots.names]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.score, self.pos, self.head, self.tail) if a is not None)


class ScoredCache(WindowCache):
    """A window whose ring keeps the top-scoring tokens of ``policy``, per kv head or in
    the pool ``slots`` gives."""

    def __init__(self, *, policy: Policy, recent: int = 32, slots=None, **window_args):
        super().__init__(eviction=lambda capacity: Scored(policy, capacity, recent, slots),
                         **window_args)
        if self.layout.kc.block != 1:
            raise ValueError("a scored cache stores keys per token")
