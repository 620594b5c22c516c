"""``QuantizedCache``: keys and values quantized with their own bits, a full-precision
residual window of recent tokens, optionally a middle of ``middle`` tokens at
``middle_bits`` before it (bits by token age), per-token or per-channel (KIVI) key groups
and an optional randomized Hadamard rotation of the keys. It grows with the conversation."""

from __future__ import annotations

from .base import CompressedCache
from .eviction import Append
from .layout import make_layout


class QuantizedCache(CompressedCache):
    def __init__(self, *, key_bits: int = 4, value_bits: int = 4, group_size: int = 64,
                 key_mode: str = "token", residual: int = 0, rotate: bool = False,
                 start: int = 0, seed: int = 0, quant: str = "affine", sketch: bool = False,
                 outliers: int = 0, middle: int = 0, middle_bits: int = 4):
        layout = make_layout(key_bits=key_bits, value_bits=value_bits, group_size=group_size,
                             key_mode=key_mode, residual=residual, quant=quant, sketch=sketch,
                             outliers=outliers, middle=middle, middle_bits=middle_bits)
        super().__init__(layout=layout, eviction=Append(), start=start, rotate=rotate, seed=seed)
