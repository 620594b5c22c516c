"""Attention routing: the one place that touches mlx-lm model internals.

mlx-lm model files import ``scaled_dot_product_attention`` by name from
``mlx_lm.models.base`` and call it with the layer's cache. ``route(model)`` points that
name, in each module the model is built from, at a router: a cache that owns its
attention (an mlxkv ``CompressedCache``) gets the call (``cache.attend``); anything else
falls through to mlx-lm's own function unchanged, so other models of the same
architecture and mlx-lm's caches behave as before. ``mlxkv.load`` routes the models it
loads; a model loaded elsewhere (``mlx_lm.load``) is routed by ``mlxkv.route(model)``, and
``make_cache`` says so when a compressed cache is asked for an unrouted model.
``unroute(model)`` restores mlx-lm's function once no routed model uses the module.
Nothing happens at import time. What the caches need to know about the model is read once
by ``route`` (``shape.py``); splitting a model over processes is ``mlxkv.models.shard``.
"""

from __future__ import annotations

import sys
from collections import Counter

from ..distributed import SINGLE, Group
from ..errors import InputError
from .base import CompressedCache
from .shape import attach_shape, kept_shape, read_shape

_NAME = "scaled_dot_product_attention"
_USERS: Counter[str] = Counter()  # module name -> routed models built from it
_ROUTED_ATTR = "_mlxkv_routed_modules"


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


def _attention_modules(model) -> list[str]:
    names = sorted({type(m).__module__ for _, m in model.named_modules()})
    return [n for n in names if getattr(sys.modules.get(n), _NAME, None) is not None]


def route(model, *, name: str | None = None, group: Group | None = None) -> list[str]:
    """Route the attention calls of ``model``'s modules through mlxkv (idempotent per
    model) and keep its ``ModelShape`` with it (``name``: what a saved cache calls the
    model, by default its architecture; ``group``: the tensor-parallel group it was split
    over; both default to what the model's shape says already, e.g. after
    ``mlxkv.models.shard``). Returns the module names."""
    routed = getattr(model, _ROUTED_ATTR, None)
    if routed is not None:
        return list(routed)
    kept = kept_shape(model)
    attach_shape(model, read_shape(model, name=name or (kept.name if kept else None),
                                   group=group or (kept.group if kept else SINGLE)))
    routed = _attention_modules(model)
    for name in routed:
        module = sys.modules[name]
        fn = getattr(module, _NAME)
        if getattr(fn, "mlxkv_original", None) is None:
            setattr(module, _NAME, _router(fn))
        _USERS[name] += 1
    object.__setattr__(model, _ROUTED_ATTR, tuple(routed))  # not an mlx parameter
    return routed


def unroute(model) -> None:
    """Undo ``route(model)``: mlx-lm's own function is back in each module no other routed
    model uses."""
    routed = getattr(model, _ROUTED_ATTR, None)
    if routed is None:
        return
    for name in routed:
        _USERS[name] -= 1
        module = sys.modules[name]
        fn = getattr(module, _NAME)
        if _USERS[name] <= 0 and getattr(fn, "mlxkv_original", None) is not None:
            setattr(module, _NAME, fn.mlxkv_original)
            del _USERS[name]
    object.__delattr__(model, _ROUTED_ATTR)


def is_routed(model) -> bool:
    return getattr(model, _ROUTED_ATTR, None) is not None
