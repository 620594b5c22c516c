"""The one place that touches mlx-lm model internals.

mlx-lm model files import ``scaled_dot_product_attention`` by name from
``mlx_lm.models.base`` and call it with the layer's cache. ``route_attention(model)``
points that name, in each module the loaded model is built from, at a router: a cache
that owns its attention (an mlxkv ``CompressedCache``) gets the call; anything else
falls through to mlx-lm's own function unchanged. Nothing happens at import time, and
routing a module twice is a no-op.
"""

from __future__ import annotations

import sys

import mlx.core as mx

from .cache.base import CompressedCache
from .errors import InputError

_NAME = "scaled_dot_product_attention"


def _router(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None, **kw):
        if isinstance(cache, CompressedCache):
            if sinks is not None:  # make_cache refuses such models; this guards hand-made caches
                raise InputError("mlxkv's compressed caches do not support learned attention "
                                 "sinks: use the full cache for this model")
            return cache.attend(queries, scale=scale, mask=mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                        sinks=sinks, **kw)

    scaled_dot_product_attention.mlxkv_original = original
    return scaled_dot_product_attention


def route_attention(model) -> list[str]:
    """Route the attention calls of ``model``'s modules through mlxkv; returns their names."""
    routed = []
    for name in sorted({type(m).__module__ for _, m in model.named_modules()}):
        module = sys.modules.get(name)
        fn = getattr(module, _NAME, None)
        if fn is None:
            continue
        if getattr(fn, "mlxkv_original", None) is None:
            setattr(module, _NAME, _router(fn))
        routed.append(name)
    return routed


def learned_sinks(model) -> bool:
    """Whether the model's attention adds learned sink logits (e.g. gpt-oss): mlx-lm
    passes them to ``scaled_dot_product_attention`` from an attention module's ``sinks``."""
    return any(isinstance(getattr(m, "sinks", None), mx.array) for _, m in model.named_modules())


def model_head_dim(model) -> int:
    args = model.args
    return getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
