"""``WindowCache``: attention sinks + the most recent ``window`` tokens (StreamingLLM).

Memory is constant once the window is full, during a long chunked prefill too, and the
sinks stay visible to every query, in multi-token chunks as well. With ``key_bits`` /
``value_bits`` the window is stored quantized (a quantized window); then the window is
kept in whole flush units, so it holds between ``window`` and ``window + unit - 1`` tokens.
"""

from __future__ import annotations

from .base import CompressedCache
from .eviction import Positional
from .layout import Layout, make_layout


def window_layout(*, window: int, sinks: int = 4, key_bits: int | None = None,
                  value_bits: int | None = None, **settings) -> tuple[Layout, int]:
    """The layout of a window of ``window`` tokens (its residual and middle included),
    and its ring's capacity (whole units). ``settings``: ``make_layout``'s."""
    layout = make_layout(key_bits=key_bits, value_bits=value_bits, sinks=sinks, **settings)
    ring = max(window - layout.held_back, layout.unit)
    return layout, -(-ring // layout.unit) * layout.unit


class WindowCache(CompressedCache):
    """``window_layout`` + an eviction strategy made for the ring's capacity:
    ``Positional`` here (the oldest go), a policy's scores in ``ScoredCache``."""

    def __init__(self, *, rotate: bool = False, seed: int = 0, budget: int | None = None,
                 eviction=Positional, **window):
        layout, capacity = window_layout(**window)
        super().__init__(layout=layout, eviction=eviction(capacity), rotate=rotate, seed=seed,
                         budget=budget)
        self.window = window["window"]
