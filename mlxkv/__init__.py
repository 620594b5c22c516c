"""mlxkv: an MLX-native LLM runtime whose heart is the KV cache."""

from . import _blas  # noqa: F401  (must precede the first import of mlx)
from .cache.config import CacheConfig, make_cache
from .chat import ChatSession
from .errors import MlxkvError
from .generation import GenerationEvent, Sampling, generate, stream_generate
from .models.loader import load
from .stats import CacheStats, LayerStats, cache_stats

__all__ = [
    "CacheConfig", "CacheStats", "ChatSession", "GenerationEvent", "LayerStats", "MlxkvError",
    "Sampling", "cache_stats", "generate", "load", "make_cache", "stream_generate",
]
__version__ = "0.1.0"
