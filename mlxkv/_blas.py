"""Use the system's OpenBLAS for MLX's CPU backend on Linux, whatever the import order.

The ``mlx[cpu]`` wheel for Linux bundles the reference (netlib) BLAS, which makes every
matrix product 20-30x slower than an optimized BLAS. MLX resolves ``cblas_sgemm`` and
friends through the dynamic linker when ``mlx.core`` is loaded (Python loads extensions
with ``RTLD_NOW``), so an OpenBLAS must be loaded with ``RTLD_GLOBAL`` *before* that
first import: loading it later changes nothing.

Two ways in, so that ``import mlx.core`` before ``import mlxkv`` is as fast as after:

- the start-up hook ``mlxkv-blas.pth``, which installing mlxkv puts in site-packages (see
  ``setup.py``): at interpreter start it runs ``install_hook()``, which only adds an
  import hook to ``sys.meta_path``; nothing is loaded until some code imports ``mlx``,
  and then OpenBLAS is loaded just before it and the hook removes itself;
- ``import mlxkv`` loads it itself if mlx is not imported yet (e.g. from a source
  checkout that was not installed).

Where neither could act, ``import mlxkv`` warns once, saying why and what to do. This
module imports nothing but the standard library: the start-up hook loads it on its own,
without importing the ``mlxkv`` package. No effect on macOS (Metal/Accelerate) or with
``MLXKV_BLAS=0``.
"""

from __future__ import annotations

import os
import sys

# ctypes is imported where it is used: at interpreter start-up only os and sys are needed.

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
INSTALL_HINT = ("install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
                "Fedora: dnf install openblas-pthreads)")


def wanted() -> bool:
    """True where mlxkv should put OpenBLAS under MLX: Linux, unless MLXKV_BLAS=0."""
    return sys.platform.startswith("linux") and os.environ.get("MLXKV_BLAS") != "0"


def find_openblas() -> list[str]:
    import ctypes.util

    found = ctypes.util.find_library("openblas")
    return ([found] if found else []) + [p for p in _CANDIDATES if os.path.exists(p)]


def preload_openblas() -> str | None:
    """Load a system OpenBLAS globally, if mlx.core is not loaded yet; returns its path,
    or None when nothing was loaded."""
    if not wanted() or "mlx.core" in sys.modules:
        return None
    import ctypes

    for path in find_openblas():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return None


class _BeforeMlx:
    """A ``sys.meta_path`` entry that finds nothing: it loads OpenBLAS when ``mlx`` is
    about to be imported, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlx" or name.startswith("mlx."):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            preload_openblas()
        return None


def install_hook() -> bool:
    """Called by ``mlxkv-blas.pth`` at interpreter start; True if the hook was added."""
    if not wanted() or "mlx" in sys.modules:
        return False
    if not any(type(f).__name__ == "_BeforeMlx" for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMlx())
    return True


def loaded_libraries() -> list[str]:
    """Shared objects of this process in the dynamic linker's load order (Linux)."""
    import ctypes

    class PhdrInfo(ctypes.Structure):  # the first two fields of struct dl_phdr_info
        _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]

    names: list[str] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(PhdrInfo), ctypes.c_size_t,
                                     ctypes.c_void_p)

    def collect(info, size, data):
        names.append((info.contents.name or b"").decode(errors="replace"))
        return 0

    libc = ctypes.CDLL(None)
    libc.dl_iterate_phdr(callback_type(collect), None)
    return names


def mlx_uses_openblas() -> bool:
    """Whether MLX's library was bound to an OpenBLAS: one was loaded before it (Linux)."""
    names = [os.path.basename(n) for n in loaded_libraries()]
    blas = next((i for i, n in enumerate(names) if n.startswith("libopenblas")), None)
    mlx = next((i for i, n in enumerate(names) if n.startswith("libmlx")), None)
    return blas is not None and mlx is not None and blas < mlx


def warn_if_slow() -> None:
    """One ``RuntimeWarning`` at the code importing mlxkv when MLX runs on the slow BLAS."""
    reason = slow_blas_reason()
    if reason:
        import warnings

        warnings.warn(reason, RuntimeWarning, stacklevel=3)


def slow_blas_reason() -> str | None:
    """Why MLX in this process runs on the reference BLAS and what to do, or None when it
    does not (or mlxkv is not meant to change it here)."""
    if not wanted() or "mlx.core" not in sys.modules or mlx_uses_openblas():
        return None
    if not find_openblas():
        return (f"MLX's CPU backend is using its bundled reference BLAS (20-30x slower): "
                f"no OpenBLAS on this machine; {INSTALL_HINT} (MLXKV_BLAS=0 silences this)")
    return ("MLX's CPU backend is using its bundled reference BLAS (20-30x slower): mlx was "
            "imported before mlxkv and mlxkv's start-up hook (mlxkv-blas.pth) is not "
            "installed; install mlxkv with pip (pip install -e . in a checkout) or import "
            "mlxkv before mlx (MLXKV_BLAS=0 silences this)")

