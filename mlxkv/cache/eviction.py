"""Eviction strategies: which ring slots flushed tokens go to, and what makes room.

A strategy is the one part of a compressed cache that differs between a growing cache,
a streaming window and a budget that evicts by scores. The cache (``base``) hands it
the tokens it flushes from the residual and asks it for the ring as a ``Segment``.

- ``Append``: the ring grows (``QuantizedCache``); nothing is evicted.
- ``Positional``: a ring of ``capacity`` slots where the newest tokens overwrite the
  oldest (``WindowCache``, a budget with the ``window`` policy).
- ``Scored`` (``scored.py``): the top-scoring tokens by a policy, per kv head or in a
  pool of slots shared by a layer's heads (``adaptive.py``).

The protocol (the base class below does the no-op parts):
``write(layout, keys, values)``, ``place(layout, keys, values)`` (a decode step's token
whose codes the fused kernel makes itself, or None), ``ring_segment(layout)``, ``rule(layout)`` (an extra
visibility rule for chunked prefill, or None), ``tokens_per_head(layout)``,
``observed_rows(queries)``/``observe(layout, mass, first)`` (learning from attention),
``arrays(layout, offset)``/``set_arrays(arrays)`` (named state) and ``nbytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from .layout import Layout
from .segments import Segment


@dataclass
class Placement:
    """Where a decode step's one new token goes, for the fused kernel that quantizes it
    in the same launch as its attention. The kernel reads the ring's current storage with
    the new token in ``slot`` (B, H) int32, over ``length`` slots; ``store`` then puts the
    kernel's codes (key parts, value parts) in and updates the counters, as ``write`` would
    have; ``ring_order`` maps the ring's attention mass in the kernel's slot order to the
    ring's order after ``store`` (None: the same)."""
    slot: mx.array
    length: int
    store: Callable[[tuple, tuple], None]
    ring_order: Callable[[mx.array], mx.array] | None = None


class Eviction:
    bounded = False
    capacity: int | None = None
    shared_slots = False  # slots pooled across a layer's kv heads (no per-head ring)

    def check_batch(self, batch: int) -> None:
        """Called with the batch size of the first tokens (a strategy may refuse it)."""

    def positions(self, layout: Layout) -> mx.array | None:
        """Token positions of the ring's slots, in slot order."""
        raise NotImplementedError

    def place(self, layout: Layout, keys: mx.array, values: mx.array) -> Placement | None:
        """Where one token (B, H, 1, D) would be written (``Placement``), or None when this
        strategy cannot say before its codes exist. May allocate ring storage."""
        return None

    def heads(self, layout: Layout) -> mx.array | None:
        return None

    def ring_segment(self, layout: Layout) -> Segment | None:
        if not layout.ring_len:
            return None
        ks, vs = layout.ring_slots()
        return Segment(layout.kc, ks, layout.vc, vs, layout.ring_len,
                       self.positions(layout), self.heads(layout))

    def rule(self, layout: Layout):
        return None

    def tokens_per_head(self, layout: Layout) -> int:
        return layout.ring_len

    def observed_rows(self, queries: tuple[int, int, int]) -> tuple[int, int] | None:
        """Which rows of queries ``first .. first + n`` of a chunk of L (``queries`` =
        (first, n, L)) this strategy learns from, as a (start, stop) range, or None."""
        return None

    def observe(self, layout: Layout, mass: mx.array, first: int) -> None:
        """Attention mass (B, H, T) the observed rows gave each held token, in segment
        order (sinks, ring, residual, chunk); ``first``: position of the chunk's first token."""

    def statistics(self) -> list[mx.array]:
        """What attention has taught it so far (evaluated after each prompt chunk)."""
        return []

    def arrays(self, layout: Layout, offset: int) -> dict:
        return {}

    def set_arrays(self, arrays: dict) -> None:
        pass

    def v1_names(self) -> list[str]:
        return []

    @property
    def nbytes(self) -> int:
        return 0


class Append(Eviction):
    """The ring grows by steps; nothing is evicted."""

    def write(self, layout: Layout, keys: mx.array, values: mx.array) -> None:
        n = keys.shape[2]
        layout.reserve_ring(layout.ring_len + n, keys, values)
        layout.write_ring(layout.ring_len, keys, values)
        self._advance(layout, n)

    def place(self, layout, keys, values):
        at = layout.ring_len
        layout.reserve_ring(at + 1, keys, values)

        def store(coded_k, coded_v):
            layout.store_ring(at, coded_k, coded_v, 1)
            self._advance(layout, 1)

        return Placement(mx.full(keys.shape[:2], at, mx.int32), at + 1, store)

    @staticmethod
    def _advance(layout: Layout, n: int) -> None:
        """Count n tokens written at the ring's end."""
        layout.flushed += n
        layout.ring_len += n

    def positions(self, layout):
        return layout.sinks + layout.flushed - layout.ring_len + mx.arange(layout.ring_len)


class Positional(Eviction):
    """A ring of ``capacity`` slots written in turn: the newest overwrite the oldest."""

    bounded = True

    def __init__(self, capacity: int):
        self.capacity = capacity

    def write(self, layout: Layout, keys: mx.array, values: mx.array) -> None:
        n, cap = keys.shape[2], self.capacity
        if n > cap:
            drop = n - cap
            keys, values = keys[..., drop:, :], values[..., drop:, :]
            layout.flushed += drop
            n = cap
        layout.reserve_ring(min(layout.flushed + n, cap), keys, values, limit=cap)
        at = layout.flushed % cap
        first = min(n, cap - at)
        layout.write_ring(at, keys[..., :first, :], values[..., :first, :])
        if first < n:
            layout.write_ring(0, keys[..., first:, :], values[..., first:, :])
        self._advance(layout, n)

    def place(self, layout, keys, values):
        cap = self.capacity
        layout.reserve_ring(min(layout.flushed + 1, cap), keys, values, limit=cap)
        at = layout.flushed % cap

        def store(coded_k, coded_v):
            layout.store_ring(at, coded_k, coded_v, 1)
            self._advance(layout, 1)

        return Placement(mx.full(keys.shape[:2], at, mx.int32), min(layout.flushed + 1, cap), store)

    def _advance(self, layout: Layout, n: int) -> None:
        """Count n tokens written: the ring holds the newest ``capacity`` of them."""
        layout.flushed += n
        layout.ring_len = min(layout.flushed, self.capacity)

    def positions(self, layout):
        last = layout.flushed - 1
        return layout.sinks + last - (last - mx.arange(layout.ring_len)) % self.capacity

    def rule(self, layout):
        """A query of a prompt chunk sees the sinks and what the ring would still hold
        had the tokens come one at a time: chunked and token-by-token feeding agree."""
        sinks, cap = layout.sinks, self.capacity

        def within(kpos, qpos):
            flushed = layout.ring_flushed(qpos + 1 - sinks)
            return (kpos < sinks) | (kpos >= sinks + mx.maximum(flushed - cap, 0))

        return within
