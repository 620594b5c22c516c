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
class RankStats:
    """One process's part of a cache split over a group (``mlxkv.distributed``)."""

    rank: int
    nbytes: int
    used_nbytes: int
    kept: int
    budget: int | None


@dataclass(frozen=True)
class CacheStats:
    """A model's cache: per layer, and in a group the whole cache (token counts as one
    rank sees them, bytes added over the ranks) with each rank's part in ``ranks``."""

    layers: list[LayerStats] = field(default_factory=list)
    budget: int | None = None
    ranks: tuple[RankStats, ...] = ()

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


_BITS = (2, 3, 4, 8)
_COUNTS = ("seen", "kept_full", "evicted")
_BYTES = ("nbytes", "fp16_nbytes", "used_nbytes", "dense_nbytes")
_WIDTH = len(_COUNTS) + len(_BITS) + len(_BYTES)


def gather_stats(cache, group, flags: tuple[int, ...] = ()) -> tuple[CacheStats, list[tuple[int, ...]]]:
    """The whole cache of a model split over ``group`` (a collective: every rank calls it
    at the same point), and every rank's ``flags`` (small whole numbers that travel with
    the statistics, e.g. "stop"). Token counts are the most any rank holds (the ranks see
    the same tokens), bytes the sum over the ranks."""
    local = cache_stats(cache)
    if group.size == 1:
        return local, [tuple(flags)]
    row = []
    for s in local.layers:
        row += [getattr(s, k) for k in _COUNTS] + [s.kept_quantized.get(b, 0) for b in _BITS]
        row += [getattr(s, k) for k in _BYTES]
    rows = group.gather(row + [local.budget or 0] + list(flags))
    n = len(local.layers)
    per = rows[:, : n * _WIDTH].reshape(group.size, n, _WIDTH)
    top, total = per.max(axis=0), per.sum(axis=0)
    layers, c, b = [], len(_COUNTS), len(_COUNTS) + len(_BITS)
    for i, s in enumerate(local.layers):
        quantized = {bits: int(top[i, c + j]) for j, bits in enumerate(_BITS) if top[i, c + j]}
        layers.append(LayerStats(seen=int(top[i, 0]), kept_full=int(top[i, 1]),
                                 kept_quantized=quantized, evicted=int(top[i, 2]),
                                 **{k: int(total[i, b + j]) for j, k in enumerate(_BYTES)},
                                 dtype=s.dtype))
    budgets = rows[:, n * _WIDTH]
    ranks = tuple(RankStats(rank=r, nbytes=int(per[r, :, b].sum()),
                            used_nbytes=int(per[r, :, b + 2].sum()),
                            kept=int((per[r, :, 1] + per[r, :, c:b].sum(axis=1)).max(initial=0)),
                            budget=int(budgets[r]) or None) for r in range(group.size))
    merged = CacheStats(layers=layers, budget=int(budgets.sum()) or None, ranks=ranks)
    return merged, [tuple(int(x) for x in r[n * _WIDTH + 1:]) for r in rows]
