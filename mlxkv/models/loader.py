"""``load``: an alias or a path to ``(model, tokenizer)``."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..distributed import SINGLE, Group
from ..errors import ModelFileError
from .gguf import load_gguf
from .sources import ResolvedModel, resolve


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def compute_dtype() -> mx.Dtype:
    """float16 on a GPU (Metal); float32 on the CPU backend, where half-precision math is slow."""
    return mx.float16 if on_gpu() else mx.float32


def load_resolved(resolved: ResolvedModel, *, dtype: mx.Dtype | None = None,
                  dequantize: bool | None = None, group: Group = SINGLE):
    """Load a resolved model.

    On Metal, quantized weights stay quantized. On the CPU backend MLX's quantized matmul
    has no fast path (20x slower than a float32 product through BLAS), so by default the
    weights are expanded to ``dtype`` at load time; ``dequantize`` overrides that choice.
    With a ``group`` of several processes (``mlx.launch``), each keeps its share of the
    weights (see ``mlxkv.distributed``); they are split before they are evaluated.
    """
    from mlx_lm.utils import dequantize_model

    from ..cache.route import route
    from .shard import shard

    dtype = dtype or compute_dtype()
    if resolved.format == "gguf":
        model, tokenizer = load_gguf(resolved.path, chat_template=resolved.chat_template)
    else:
        model, tokenizer = _load_mlx_folder(resolved.path)
    if dequantize if dequantize is not None else not on_gpu():
        model = dequantize_model(model)
    model.set_dtype(dtype, lambda d: mx.issubdtype(d, mx.floating))
    shard(model, group)
    mx.eval(model.parameters())
    # attention calls reach mlxkv's caches (mlxkv/cache/route.py); the model's shape is kept
    route(model, name=resolved.alias or Path(resolved.path).name)
    return model, tokenizer


def _load_mlx_folder(path: Path):
    from mlx_lm.utils import load as mlx_lm_load

    try:
        return mlx_lm_load(str(path))
    except (FileNotFoundError, ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"cannot load model folder {path}: {e}") from None


def load(name: str | None = None, *, dtype: mx.Dtype | None = None,
         dequantize: bool | None = None, network: bool = True, group: Group = SINGLE):
    """Load a model by alias (see ``models.toml``), local path or hub repo.

    Returns ``(model, tokenizer)``: an mlx-lm model, its attention routed to mlxkv's
    caches (``mlxkv.route``), and mlx-lm's ``TokenizerWrapper``. ``group``
    (``mlxkv.distributed.init()`` under ``mlx.launch``) splits it tensor parallel.
    """
    return load_resolved(resolve(name, network=network), dtype=dtype, dequantize=dequantize,
                         group=group)
