"""mlxkv: an MLX-native LLM runtime whose heart is the KV cache."""

from . import _blas

_blas.preload_openblas()  # before the first import of mlx (if the start-up hook did not)
from .cache.config import CacheConfig  # noqa: E402
from .cache.make import make_cache  # noqa: E402
from .cache.plan import CachePlan, plan  # noqa: E402
from .cache.route import route, unroute  # noqa: E402
from .cache.shape import ModelShape, shape_of  # noqa: E402
from .chat import ChatSession
from .errors import MlxkvError
from .generation import GenerationEvent, Sampling, generate, stream_generate
from .models.loader import load
from .stats import CacheStats, LayerStats, cache_stats

__all__ = [
    "CacheConfig", "CachePlan", "CacheStats", "ChatSession", "GenerationEvent", "LayerStats",
    "MlxkvError", "ModelShape", "Sampling", "cache_stats", "generate", "load", "make_cache", "plan",
    "route", "shape_of", "stream_generate", "unroute",
]
__version__ = "0.1.0"

_blas.warn_if_slow()  # one warning, at the import of mlxkv
