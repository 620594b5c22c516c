"""``FullCache``: keys and values at full precision, preallocated in steps of 256 tokens.

It is mlx-lm's ``KVCache`` (same buffers, same growth, same attention path: greedy tokens
and logits are identical), plus an optional storage dtype and live statistics.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..stats import LayerStats, dtype_name


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
        if self.keys is None:
            return LayerStats(seen=self.offset, kept_full=self.offset, kept_quantized={},
                              evicted=0, nbytes=0, fp16_nbytes=0, used_nbytes=0, dense_nbytes=0)
        elements = self.keys.shape[0] * self.keys.shape[1] * (self.keys.shape[3] + self.values.shape[3])
        dense = elements * self.keys.dtype.size * self.offset  # the kept tokens, uncompressed
        return LayerStats(seen=self.offset, kept_full=self.offset, kept_quantized={}, evicted=0,
                          nbytes=self.nbytes, fp16_nbytes=2 * elements * self.offset,
                          used_nbytes=dense, dense_nbytes=dense, dtype=dtype_name(self.keys.dtype))
