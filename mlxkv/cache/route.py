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
Nothing happens at import time.
"""

from __future__ import annotations

import sys
from collections import Counter

import mlx.core as mx

from ..distributed import SINGLE, Group
from ..errors import GroupError, InputError
from .base import CompressedCache

_NAME = "scaled_dot_product_attention"
_USERS: Counter[str] = Counter()  # module name -> routed models built from it
_ROUTED_ATTR = "_mlxkv_routed_modules"
_GROUP_ATTR = "mlxkv_group"


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


def route(model) -> list[str]:
    """Route the attention calls of ``model``'s modules through mlxkv (idempotent per
    model); returns the module names."""
    routed = getattr(model, _ROUTED_ATTR, None)
    if routed is not None:
        return list(routed)
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


def learned_sinks(model) -> bool:
    """Whether the model's attention adds learned sink logits (e.g. gpt-oss): mlx-lm
    passes them to ``scaled_dot_product_attention`` from an attention module's ``sinks``."""
    return any(isinstance(getattr(m, "sinks", None), mx.array) for _, m in model.named_modules())


def model_head_dim(model) -> int:
    args = model.args
    return getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads


def model_q_heads(model) -> int:
    """Query heads of this process's share of the model (all of them in one process)."""
    return model.args.num_attention_heads // model_group(model).size


def model_kv_heads(model) -> int:
    """Kv heads of this process's share of the model: the heads its caches hold."""
    heads = model.args.num_key_value_heads or model.args.num_attention_heads
    return heads // model_group(model).size


def model_group(model) -> Group:
    """The group ``model`` is split over (``shard``); a group of one if it is not."""
    return getattr(model, _GROUP_ATTR, SINGLE)


def shard(model, group: Group) -> None:
    """Split ``model`` over ``group``, tensor parallel, with mlx-lm's own ``model.shard``:
    each rank keeps 1/N of the attention heads (and so the caches of its own kv heads) and
    of the MLP. A model that cannot be split that way is a ``GroupError``."""
    if group.size == 1:
        return
    arch = type(model).__module__.split(".")[-1]
    if not callable(getattr(model, "shard", None)):
        raise GroupError(f"mlx-lm cannot split {arch} models over processes (they have no "
                         "tensor-parallel shard): run this model in one process")
    args, n = model.args, group.size
    sizes = {"{} query heads": args.num_attention_heads,
             "{} kv heads": args.num_key_value_heads or args.num_attention_heads,
             "an MLP width of {}": getattr(args, "intermediate_size", None) or n}
    bad = [k.format(v) for k, v in sizes.items() if v % n]
    if bad:
        fits = [d for d in range(2, 65) if all(v % d == 0 for v in sizes.values())]
        what = ", ".join(bad[:-1]) + " and " + bad[-1] if len(bad) > 1 else bad[0]
        fix = (f"launch {' or '.join(map(str, fits))} processes (mlx.launch -n)" if fits
               else "it runs in one process only")
        raise GroupError(f"this model's {what} do not divide over {n} processes: {fix}")
    model.shard(group.group)
    setattr(model, _GROUP_ATTR, group)


def model_dtype(model) -> mx.Dtype:
    """The dtype of the model's activations (and so of its keys and values): that of its
    first floating-point parameter."""
    from mlx.utils import tree_flatten

    return next(v.dtype for _, v in tree_flatten(model.parameters())
                if mx.issubdtype(v.dtype, mx.floating))
