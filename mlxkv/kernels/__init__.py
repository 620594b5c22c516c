"""mlxkv's kernels: one module per kernel, each with the Metal call (sources in
``metal_kernels/``), a pure-MLX reference, and a dispatcher that uses Metal when a
Metal device is present and the shape is supported, the reference otherwise.

``MLXKV_KERNELS`` chooses: ``auto`` (default), ``reference`` (never Metal), ``metal``
(Metal whenever the shape is supported, e.g. under the CPU simulator in tests).
"""

from ._metal import mode as kernel_mode, use_metal
from .codebook_attention import codebook_preflight
from .quantize_rows import quantize_rows
from .sdpa_quantized import QuantizedKV, sdpa_quantized



def metal_enabled() -> bool:
    """Whether the dispatchers would use Metal for a supported shape (a quick check
    before building a kernel's arguments)."""
    return use_metal(True)


__all__ = ["QuantizedKV", "codebook_preflight", "kernel_mode", "metal_enabled", "quantize_rows",
           "sdpa_quantized"]
