"""mlxkv's kernels: one module per kernel, each with the Metal call (sources in
``metal_kernels/``), a pure-MLX reference, and a dispatcher that uses Metal when a
Metal device is present and the shape is supported, the reference otherwise.

``MLXKV_KERNELS`` chooses: ``auto`` (default), ``reference`` (never Metal), ``metal``
(Metal whenever the shape is supported, e.g. under the CPU simulator in tests).
"""

from .attention_stats import attention_mass
from .quantize_rows import quantize_rows
from .sdpa_quantized import QuantizedKV, sdpa_quantized

__all__ = ["QuantizedKV", "attention_mass", "quantize_rows", "sdpa_quantized"]
