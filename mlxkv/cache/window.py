"""``WindowCache``: attention sinks + the most recent ``window`` tokens (StreamingLLM).

Memory is constant once the window is full, during a long chunked prefill too, and the
sinks stay visible to every query, in multi-token chunks as well. With ``key_bits`` /
``value_bits`` the window is stored quantized (a quantized window); then the window is
kept in whole flush units, so it holds between ``window`` and ``window + unit - 1`` tokens.
"""

from __future__ import annotations

from .base import CompressedCache
from .codec import make_codec
from .eviction import Positional
from .layout import Layout


def window_layout(*, window: int, sinks: int = 4, key_bits: int | None = None,
                  value_bits: int | None = None, group_size: int = 64, key_mode: str = "token",
                  residual: int = 0, quant: str = "affine", sketch: bool = False) -> tuple[Layout, int]:
    """The layout of a window of ``window`` tokens, and its ring's capacity (whole units)."""
    layout = Layout(key_codec=make_codec(key_bits, group_size, key_mode, quant, sketch),
                    value_codec=make_codec(value_bits, group_size, "token", quant),
                    sinks=sinks, residual=residual)
    ring = max(window - residual, layout.unit)
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
