"""``WindowCache``: attention sinks + the most recent ``window`` tokens (StreamingLLM).

Memory is constant once the window is full, during a long chunked prefill too, and the
sinks stay visible to every query, in multi-token chunks as well. With ``key_bits`` /
``value_bits`` the window is stored quantized (a quantized window); then the window is
kept in whole flush units, so it holds between ``window`` and ``window + unit - 1`` tokens.
"""

from __future__ import annotations

from .base import CompressedCache, make_codec


class WindowCache(CompressedCache):
    def __init__(self, *, window: int, sinks: int = 4, key_bits: int | None = None,
                 value_bits: int | None = None, group_size: int = 64, key_mode: str = "token",
                 residual: int = 0, rotate: bool = False, seed: int = 0,
                 budget: int | None = None):
        kc = make_codec(key_bits, group_size, key_mode)
        vc = make_codec(value_bits, group_size, "token")
        super().__init__(key_codec=kc, value_codec=vc, sinks=sinks, residual=residual,
                         capacity=1, rotate=rotate, seed=seed, budget=budget)
        ring = max(window - residual, self.unit)
        self.capacity = -(-ring // self.unit) * self.unit
        self.window = window
