"""Save a conversation's KV cache in its compressed form, and load it back.

One ``.safetensors`` file: every layer's arrays as stored (packed, quantized), by name
(``layer.<i>.<name>``), plus metadata: the format version, the model's identity, the
cache config, each layer's counters and the token ids the cache holds. A load into
another model or with a config that does not match is a clear error; a save is atomic
(temp file + rename). Files of earlier formats still load (``persist_upgrades``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .cache.config import CacheConfig
from .cache.make import make_cache
from .cache.full import FullCache
from .cache.shape import shape_of
from .errors import CacheFileError
from .persist_upgrades import FORMATS, by_name

FORMAT = FORMATS[-1]


def _layer_arrays(c) -> tuple[dict, list[str]]:
    """A layer's arrays by name, and its counters."""
    if isinstance(c, FullCache):
        if c.keys is None:
            return {}, ["0"]
        return {"keys": c.keys[..., : c.offset, :], "values": c.values[..., : c.offset, :]}, [str(c.offset)]
    return dict(tree_flatten(c.state)), list(c.meta_state)


def save_cache(path: str | Path, cache: list, *, model, config: CacheConfig,
               tokens: list[int], extra: dict | None = None) -> Path:
    """Write ``cache`` to ``path`` (a .safetensors file), atomically."""
    path = Path(path)
    arrays, metas, classes = {}, [], []
    for i, c in enumerate(cache):
        layer, meta = _layer_arrays(c)
        for name, a in layer.items():
            arrays[f"layer.{i}.{name}"] = a
        metas.append(meta)
        classes.append(type(c).__name__)
    metadata = {
        "format": FORMAT,
        "model": json.dumps(shape_of(model).identity, sort_keys=True),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "classes": json.dumps(classes),
        "meta": json.dumps(metas),
        "tokens": json.dumps([int(t) for t in tokens]),
        "extra": json.dumps(extra or {}),
        "group": _group_text(shape_of(model).group),
    }
    return atomic_write(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata))


def _group_text(group) -> str:
    return f"{group.rank}/{group.size}"


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(temp_path)`` next to ``path``, then rename over ``path``: a crash
    mid-write leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_cache(path: str | Path, model) -> tuple[list, CacheConfig, list[int], dict]:
    """Read a saved cache for ``model``: (cache, config, token ids, extra metadata)."""
    path = Path(path)
    if not path.exists():
        raise CacheFileError(f"no saved cache at {path}")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise CacheFileError(f"{path} is not a readable cache file: {e}") from None
    if meta.get("format") not in FORMATS:
        raise CacheFileError(f"{path} is not an mlxkv cache file (format {meta.get('format')!r})")
    try:
        identity = json.loads(meta["model"])
        config = CacheConfig(**json.loads(meta["config"]))
        classes, metas = json.loads(meta["classes"]), json.loads(meta["meta"])
        tokens, extra = json.loads(meta["tokens"]), json.loads(meta["extra"])
    except (KeyError, TypeError, ValueError) as e:
        raise CacheFileError(f"{path} has damaged metadata: {e}") from None
    shape = shape_of(model)
    if identity != shape.identity:
        raise CacheFileError(f"{path} was saved with model {identity.get('name')!r} "
                             f"({identity}), not the loaded {shape.name!r}")
    saved, here = meta.get("group", "0/1"), _group_text(shape.group)
    if saved != here:
        rank, size = saved.split("/")
        by = "one process" if size == "1" else f"rank {rank} of a group of {size} processes"
        now = "one process" if here == "0/1" else f"rank {here.replace('/', ' of a group of ')}"
        raise CacheFileError(f"{path} was saved by {by}, and this is {now}: it loads only into "
                             f"the same rank of a group of {size} (mlx.launch -n {size})")
    cache = make_cache(model, config)
    if [type(c).__name__ for c in cache] != classes:
        raise CacheFileError(f"{path} holds caches {sorted(set(classes))} that do not fit this model")
    by_layer = [{} for _ in cache]
    for key, a in arrays.items():
        _, i, name = (key.split(".", 2) + ["", ""])[:3]
        if not i.isdigit() or int(i) >= len(cache) or not name:
            raise CacheFileError(f"{path} holds an array {key!r} this model's cache does not have")
        by_layer[int(i)][name] = a
    for i, (c, m, layer) in enumerate(zip(cache, metas, by_layer)):
        try:
            _restore(c, layer, m, meta["format"])
        except (KeyError, IndexError, ValueError) as e:
            raise CacheFileError(f"{path}: layer {i}'s arrays are incomplete ({e})") from None
        if layer and not isinstance(c, FullCache) and not c.layout.consistent():
            raise CacheFileError(f"{path}: layer {i}'s arrays do not match its counters")
    if cache and cache[0].offset != len(tokens):
        raise CacheFileError(f"{path}: the cache holds {cache[0].offset} tokens but "
                             f"{len(tokens)} token ids were saved")
    return cache, config, tokens, extra


def _restore(c, layer: dict, meta: list[str], fmt: str) -> None:
    """Put a layer's saved arrays (of file format ``fmt``) and counters into its fresh
    cache ``c``."""
    layer = by_name(c, layer, fmt)
    if isinstance(c, FullCache):
        if layer:
            c.update_and_fetch(layer["keys"], layer["values"])
        return
    c.state = tree_unflatten(list(layer.items()))
    c.meta_state = meta
