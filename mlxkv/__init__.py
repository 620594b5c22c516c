"""mlxkv: an MLX-native LLM runtime whose heart is the KV cache."""

from . import _blas  # noqa: F401  (must precede the first import of mlx)
from .errors import MlxkvError
from .models.loader import load

__all__ = ["MlxkvError", "load"]
__version__ = "0.1.0"
