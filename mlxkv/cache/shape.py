"""``ModelShape``: the facts about a model that its caches are made and sized by, read
once per model (by ``route``, or on first use by ``shape_of``) and kept with it.

The one place that reads an mlx-lm model's arguments and modules: head dim, query and
kv heads (of this process's share, in a tensor-parallel group), which layers have a
plain full-attention cache (the ones mlxkv's caches replace), the activations' dtype,
learned attention sinks, and the identity a saved cache records.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..distributed import SINGLE, Group

_ATTR = "_mlxkv_shape"  # set with object.__setattr__: not an mlx parameter


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int                      # cache entries (mlx-lm's make_prompt_cache)
    attention_layers: tuple[int, ...]  # those with a plain KVCache: mlxkv's caches go there
    head_dim: int
    q_heads: int                     # of this rank's share
    kv_heads: int                    # of this rank's share: the heads its caches hold
    dtype: mx.Dtype                  # of the activations, and so of keys and values
    learned_sinks: bool              # attention adds learned sink logits (e.g. gpt-oss)
    group: Group = SINGLE            # the tensor-parallel group the model is split over
    context: int | None = None       # max_position_embeddings
    # what a saved cache records about the model it belongs to
    identity: dict = field(default_factory=dict, compare=False)

    @property
    def gqa(self) -> int:
        """Query heads per kv head."""
        return self.q_heads // self.kv_heads


def read_shape(model, *, name: str | None = None, group: Group = SINGLE) -> ModelShape:
    """The shape of ``model`` (already split over ``group`` when it is one)."""
    args = model.args
    q_heads = args.num_attention_heads
    kv_heads = getattr(args, "num_key_value_heads", None) or q_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // q_heads
    name = name or getattr(args, "model_type", None) or type(model).__module__.split(".")[-1]
    caches = make_prompt_cache(model)
    return ModelShape(
        name=name, layers=len(caches),
        attention_layers=tuple(i for i, c in enumerate(caches) if type(c) is KVCache),
        head_dim=head_dim, q_heads=q_heads // group.size, kv_heads=kv_heads // group.size,
        dtype=model_dtype(model),
        learned_sinks=any(isinstance(getattr(m, "sinks", None), mx.array)
                          for _, m in model.named_modules()),
        group=group, context=getattr(args, "max_position_embeddings", None),
        identity={"name": name, "layers": len(model.layers),
                  "hidden_size": getattr(args, "hidden_size", None),
                  "kv_heads": getattr(args, "num_key_value_heads", None),
                  "vocab_size": getattr(args, "vocab_size", None)})


def model_dtype(model) -> mx.Dtype:
    """The dtype of the model's activations: that of its first floating-point parameter."""
    return next(v.dtype for _, v in tree_flatten(model.parameters())
                if mx.issubdtype(v.dtype, mx.floating))


def attach_shape(model, shape: ModelShape) -> ModelShape:
    object.__setattr__(model, _ATTR, shape)
    return shape


def kept_shape(model) -> ModelShape | None:
    return model.__dict__.get(_ATTR)


def shape_of(model) -> ModelShape:
    """The shape kept with ``model`` (``route``, ``mlxkv.load``, ``shard``), read now if it
    has none."""
    shape = kept_shape(model)
    return shape if shape is not None else attach_shape(model, read_shape(model))


def current_shape(model) -> ModelShape:
    """``shape_of(model)``, its dtype read again (once per cache made: a model whose dtype
    was set after it was routed gets caches of its new dtype)."""
    shape = shape_of(model)
    dtype = model_dtype(model)
    return shape if dtype == shape.dtype else attach_shape(model, replace(shape, dtype=dtype))
