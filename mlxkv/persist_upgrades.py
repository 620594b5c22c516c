"""Cache files of earlier formats, read into today's: ``mlxkv-cache-1`` (mlxkv 0.1) kept a
layer's arrays by position ("0", "1", ...); since 0.2 (``mlxkv-cache-2``) they are kept by
name. ``persist.load_cache`` reads either."""

from __future__ import annotations

from .cache.full import FullCache

FORMATS = ("mlxkv-cache-1", "mlxkv-cache-2")  # oldest first; the last is written today


def by_name(c, layer: dict, fmt: str) -> dict:
    """A layer's saved arrays in file format ``fmt`` -> today's arrays by name, for its
    fresh cache ``c``."""
    if fmt != "mlxkv-cache-1" or not layer:
        return layer
    arrays = [layer[str(j)] for j in range(len(layer))]
    if isinstance(c, FullCache):
        names = ["keys", "values"]
    else:
        names = c.layout.v1_names() + c.eviction.v1_names()
    return dict(zip(names, arrays))
