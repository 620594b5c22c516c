"""``FullCache``: keys and values at full precision, preallocated in steps of 256 tokens.

It is mlx-lm's ``KVCache`` (same buffers, same growth, same attention path: greedy tokens
and logits are identical), plus an optional storage dtype and live statistics.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..stats import LayerStats


class FullCache(KVCache):
    def __init__(self, dtype: mx.Dtype | None = None):
        super().__init__()
        self.dtype = dtype

    def update_and_fetch(self, keys, values):
        if self.dtype is not None:
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
        return super().update_and_fetch(keys, values)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def layer_stats(self) -> LayerStats:
        per_token = 0 if self.keys is None else 2 * self.keys.shape[0] * self.keys.shape[1] * (
            self.keys.shape[3] + self.values.shape[3])
        dense = 0 if self.keys is None else per_token * self.keys.dtype.size // 2 * self.offset
        return LayerStats(seen=self.offset, kept_full=self.offset, kept_quantized={}, evicted=0,
                          nbytes=self.nbytes, fp16_nbytes=per_token * self.offset,
                          used_nbytes=dense, dense_nbytes=dense,
                          dtype=str(self.keys.dtype).split(".")[-1] if self.keys is not None else "float16")
