"""Use the system's OpenBLAS for MLX's CPU backend on Linux, when one is installed.

The ``mlx[cpu]`` wheel for Linux bundles the reference (netlib) BLAS, which makes every
matrix product 20-30x slower than an optimized BLAS. MLX resolves ``cblas_sgemm`` and
friends through the dynamic linker, so loading an OpenBLAS with ``RTLD_GLOBAL`` *before*
``mlx.core`` is first imported makes MLX use it. This changes no Python object; it has no
effect on macOS (Metal/Accelerate), when mlx was imported earlier, when no OpenBLAS is
installed (Debian/Ubuntu: ``apt-get install libopenblas0``), or with ``MLXKV_BLAS=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def preload_openblas() -> str | None:
    """Load a system OpenBLAS globally; returns its path, or None when nothing was loaded."""
    if not sys.platform.startswith("linux") or os.environ.get("MLXKV_BLAS") == "0":
        return None
    if "mlx.core" in sys.modules:
        return None
    found = ctypes.util.find_library("openblas")
    for path in ([found] if found else []) + list(_CANDIDATES):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return None


LOADED = preload_openblas()
