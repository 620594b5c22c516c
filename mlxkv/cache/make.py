"""``make_cache``: a model's per-layer caches, built from its ``CachePlan``."""

from __future__ import annotations

from mlx_lm.models.cache import make_prompt_cache

from ..errors import InputError
from ..kernels import kernel_mode
from ..policies import make_policy
from .adaptive import AdaptiveScoredCache
from .config import CacheConfig
from .full import FullCache
from .fused import preflight
from .plan import CachePlan, LayerPlan, plan
from .quantized import QuantizedCache
from .route import is_routed
from .scored import ScoredCache
from .shape import current_shape
from .window import WindowCache


def layer_cache(config: CacheConfig, layer: LayerPlan):
    """The cache of one layer, as its plan says (a budgeted layer: the window its budget
    holds)."""
    if layer.window is not None:
        args = dict(window=layer.window, sinks=config.sinks, **config.layout_settings(),
                    rotate=config.rotate, seed=config.seed + layer.index, budget=layer.budget)
        policy = make_policy(config.policy)
        if policy.name != "window" and config.allocator == "adaptive":
            return AdaptiveScoredCache(policy=policy, recent=config.recent, floor=config.floor,
                                       **args)
        if policy.name != "window":
            return ScoredCache(policy=policy, recent=config.recent, **args)
        return WindowCache(**args)
    if config.quantized:
        return QuantizedCache(**config.layout_settings(), rotate=config.rotate,
                              start=config.start, seed=config.seed + layer.index)
    return FullCache()


def make_cache(model, config: CacheConfig | CachePlan | None = None, *,
               batch_size: int = 1) -> list:
    """Per-layer caches for ``model``: the model's own cache layout (from mlx-lm), with
    every plain full-attention ``KVCache`` replaced by the cache ``config`` asks for (or a
    plan made for this model). Layers with a cache of their own kind (sliding-window,
    state-space) keep it. ``batch_size``: the sequences fed at once (the adaptive
    allocator takes one)."""
    shape = current_shape(model)
    p = config if isinstance(config, CachePlan) else plan(config, shape)
    if p.shape != shape:
        raise InputError("this cache plan was made for another model (or another dtype or "
                         "group of this one): make it with mlxkv.plan(config, shape_of(model))")
    config = p.config
    if config.allocator == "adaptive" and batch_size != 1:
        raise InputError(f"the adaptive allocator keeps one sequence (batch size 1, got "
                         f"{batch_size}): use allocator 'uniform' or 'pyramid' for batches")
    kernel_mode()  # a bad MLXKV_KERNELS is reported now, not at the first decode step
    if config.kind != "full":
        if shape.learned_sinks:
            raise InputError(f"{type(model).__module__.split('.')[-1]} models have learned "
                             "attention sinks, which mlxkv's compressed caches do not support: "
                             "use the full cache (no --kv-bits, --kv-window or --kv-budget)")
        if not is_routed(model):
            raise InputError("this model's attention is not routed to mlxkv's caches: call "
                             "mlxkv.route(model) first (models from mlxkv.load are routed)")
    caches = make_prompt_cache(model)
    for layer in p.layers:
        caches[layer.index] = layer_cache(config, layer)
    if p.layers and config.kind != "full":
        # every layer's cache uses the same kernels: compile them now, not mid-generation
        preflight(caches[p.layers[0].index], dtype=shape.dtype, head_dim=shape.head_dim,
                  gqa=shape.gqa)
    return caches
