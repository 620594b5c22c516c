"""The named cache configs that ``mlxkv bench`` and ``mlxkv eval`` compare: mlx-lm's own
caches (the baselines) and mlxkv's, each a factory of a model's per-layer caches."""

from __future__ import annotations

from typing import Callable

BASELINE = "mlx-lm KVCache"


def cache_factories(model, window: int = 512) -> dict[str, Callable[[], list]]:
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    from .cache.codec import default_group
    from .cache.config import CacheConfig
    from .cache.make import make_cache
    from .cache.shape import shape_of

    n = len(model.layers)
    group = default_group(shape_of(model).head_dim)  # mlxkv's configs choose the same by themselves
    mlxkv = lambda **fields: lambda: make_cache(model, CacheConfig(**fields))  # noqa: E731
    budget = dict(budget="16MB", key_bits=4, value_bits=4, residual=64)
    return {
        BASELINE: lambda: [KVCache() for _ in range(n)],
        "mlx-lm Quantized 8-bit": lambda: [QuantizedKVCache(group_size=group, bits=8) for _ in range(n)],
        "mlx-lm Quantized 4-bit": lambda: [QuantizedKVCache(group_size=group, bits=4) for _ in range(n)],
        f"mlx-lm Rotating {window}": lambda: [RotatingKVCache(max_size=window, keep=4) for _ in range(n)],
        "mlxkv full": mlxkv(),
        "mlxkv 8-bit": mlxkv(key_bits=8, value_bits=8),
        "mlxkv 4-bit": mlxkv(key_bits=4, value_bits=4),
        "mlxkv 4-bit rotated": mlxkv(key_bits=4, value_bits=4, rotate=True),
        "mlxkv 4-bit channel-K r128": mlxkv(key_bits=4, value_bits=4, key_mode="channel", residual=128),
        "mlxkv 2-bit channel-K r128": mlxkv(key_bits=2, value_bits=2, key_mode="channel", residual=128),
        f"mlxkv window {window}": mlxkv(window=window - 4, sinks=4),
        f"mlxkv 4-bit window {window}": mlxkv(window=window - 4, sinks=4, key_bits=4, value_bits=4),
        "mlxkv budget 16MB 4-bit": mlxkv(**budget, key_mode="channel"),
        **{f"mlxkv budget 16MB 4-bit {policy}": mlxkv(**budget, policy=policy)
           for policy in ("knorm", "snapkv", "h2o", "tova")},
        "mlxkv budget 16MB 4-bit snapkv adaptive": mlxkv(**budget, policy="snapkv", allocator="adaptive"),
        **{f"mlxkv {b}-bit codebook": mlxkv(key_bits=b, value_bits=b, quant="codebook")
           for b in (4, 3, 2)},
        "mlxkv codebook K4 V2": mlxkv(key_bits=4, value_bits=2, quant="codebook"),
        "mlxkv codebook K3 V2": mlxkv(key_bits=3, value_bits=2, quant="codebook"),
        "mlxkv codebook K2+sketch V2": mlxkv(key_bits=2, value_bits=2, quant="codebook", sketch=True),
        # bits by token age: the newest tokens at more bits than the older ones
        "mlxkv 3-bit codebook, 4-bit middle 512": mlxkv(key_bits=3, value_bits=3, quant="codebook",
                                                        middle=512),
        "mlxkv 2-bit codebook, 3-bit middle 768": mlxkv(key_bits=2, value_bits=2, quant="codebook",
                                                        middle=768, middle_bits=3),
        "mlxkv 3-bit codebook, 1 outlier": mlxkv(key_bits=3, value_bits=3, quant="codebook",
                                                 outliers=1),
    }
