"""``QuantizedCache``: keys and values quantized with their own bits, a full-precision
residual window of recent tokens, per-token or per-channel (KIVI) key groups and an
optional randomized Hadamard rotation of the keys. It grows with the conversation."""

from __future__ import annotations

from .base import CompressedCache
from .codec import make_codec
from .eviction import Append
from .layout import Layout


class QuantizedCache(CompressedCache):
    def __init__(self, *, key_bits: int = 4, value_bits: int = 4, group_size: int = 64,
                 key_mode: str = "token", residual: int = 0, rotate: bool = False,
                 start: int = 0, seed: int = 0, quant: str = "affine", sketch: bool = False):
        layout = Layout(key_codec=make_codec(key_bits, group_size, key_mode, quant, sketch),
                        value_codec=make_codec(value_bits, group_size, "token", quant),
                        residual=residual)
        super().__init__(layout=layout, eviction=Append(), start=start, rotate=rotate, seed=seed)
