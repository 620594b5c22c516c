"""Cache statistics, cheap enough to read after every token (no work over the cache)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerStats:
    seen: int            # tokens that went through this layer's cache
    kept_full: int       # tokens kept at full precision
    kept_quantized: dict[int, int]  # bits -> tokens kept at that precision
    evicted: int         # tokens no longer in the cache
    nbytes: int          # bytes of the cache's arrays (allocated, incl. room to grow)
    fp16_nbytes: int     # bytes an fp16 cache of the kept tokens would take
    used_nbytes: int     # bytes the kept tokens take in their storage (nbytes less room ahead)
    dense_nbytes: int    # bytes they would take uncompressed, in ``dtype``
    dtype: str = "float16"  # the cache's full-precision dtype

    @property
    def kept(self) -> int:
        return self.kept_full + sum(self.kept_quantized.values())


@dataclass(frozen=True)
class CacheStats:
    layers: list[LayerStats] = field(default_factory=list)
    budget: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers)

    @property
    def seen(self) -> int:
        return max((s.seen for s in self.layers), default=0)

    @property
    def kept(self) -> int:
        return max((s.kept for s in self.layers), default=0)

    @property
    def evicted(self) -> int:
        return sum(s.evicted for s in self.layers)

    @property
    def fp16_nbytes(self) -> int:
        return sum(s.fp16_nbytes for s in self.layers)

    @property
    def used_nbytes(self) -> int:
        """Bytes the kept tokens take (``nbytes`` less the room allocated ahead)."""
        return sum(s.used_nbytes for s in self.layers)

    @property
    def dense_nbytes(self) -> int:
        return sum(s.dense_nbytes for s in self.layers)

    @property
    def dtype(self) -> str:
        return self.layers[0].dtype if self.layers else "float16"

    @property
    def compression(self) -> float:
        """How many times smaller the kept tokens are than uncompressed in the cache's
        full-precision ``dtype`` (1.0 for an empty or uncompressed cache). Eviction is
        not in it: see ``seen``, ``kept`` and ``evicted``."""
        used = self.used_nbytes
        return self.dense_nbytes / used if used else 1.0


def dtype_name(dtype) -> str:
    """``mlx.core.float32`` -> ``"float32"``."""
    return str(dtype).split(".")[-1]


def _layer_stats(c) -> LayerStats:
    own = getattr(c, "layer_stats", None)
    if own is not None:
        return own()
    # A cache from elsewhere (e.g. mlx-lm's): only the protocol's offset and nbytes are known.
    nbytes = 0 if c.empty() else c.nbytes
    return LayerStats(seen=c.offset, kept_full=c.offset, kept_quantized={}, evicted=0,
                      nbytes=nbytes, fp16_nbytes=nbytes, used_nbytes=nbytes, dense_nbytes=nbytes)


def cache_stats(cache, budget: int | None = None) -> CacheStats:
    """Per-layer and total statistics of a model's cache (a list of per-layer caches)."""
    if budget is None:
        budget = sum(getattr(c, "budget", None) or 0 for c in cache) or None  # mlx-lm caches: none
    return CacheStats(layers=[_layer_stats(c) for c in cache], budget=budget)
