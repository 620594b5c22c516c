"""What the kernel wrappers share: loading ``.metal`` sources, building a kernel once
per source and factory, and the choice between Metal and the reference."""

from __future__ import annotations

import os
from importlib import resources

import mlx.core as mx

MODES = ("auto", "metal", "reference")


def mode() -> str:
    value = os.environ.get("MLXKV_KERNELS", "auto").lower()
    if value not in MODES:
        raise ValueError(f"MLXKV_KERNELS={value!r}: expected one of {', '.join(MODES)}")
    return value


def use_metal(supported: bool) -> bool:
    """Whether a dispatcher should call its Metal kernel for a supported shape."""
    m = mode()
    if m == "reference" or not supported:
        return False
    return m == "metal" or mx.metal.is_available()


def source(name: str) -> str:
    """The text of ``metal_kernels/<name>`` (package ``mlxkv_metal``)."""
    return resources.files("mlxkv_metal").joinpath(name).read_text()


_BUILT: dict = {}


def kernel(name: str, inputs: list[str], outputs: list[str], *, header: str = "", **options):
    """``mx.fast.metal_kernel`` for ``metal_kernels/<name>.metal``, built once per source
    and per kernel factory (so a simulator put in its place gets its own build)."""
    factory = mx.fast.metal_kernel
    key = (name, tuple(inputs), tuple(outputs), header, id(factory))
    built = _BUILT.get(key)
    if built is None or built[0] is not factory:
        head = source(header) if header else ""
        fn = factory(name=name, input_names=inputs, output_names=outputs,
                     source=source(f"{name}.metal"), header=head, **options)
        built = _BUILT[key] = (factory, fn)
    return built[1]
