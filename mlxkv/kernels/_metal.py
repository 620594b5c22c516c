"""What the kernel wrappers share: loading ``.metal`` sources, building a kernel once
per source and factory, and the choice between Metal and the reference."""

from __future__ import annotations

import contextlib
import os
import warnings
from functools import lru_cache
from importlib import resources

import mlx.core as mx

from ..errors import InputError

MODES = ("auto", "metal", "reference")


def mode() -> str:
    value = os.environ.get("MLXKV_KERNELS", "auto").lower()
    if value not in MODES:
        raise InputError(f"MLXKV_KERNELS={value!r} is not a kernel mode: set it to one of "
                         f"{', '.join(MODES)}, or unset it")
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
_FACTORIES: list = []  # kernel factories put in place of mx.fast.metal_kernel, innermost last


def factory():
    """What builds mlxkv's kernels: ``mx.fast.metal_kernel``, or the factory of the
    innermost ``kernel_factory`` (a CPU simulator of Metal, in tests and ``bench
    --simulate``)."""
    return _FACTORIES[-1] if _FACTORIES else mx.fast.metal_kernel


@contextlib.contextmanager
def kernel_factory(make):
    """Build mlxkv's kernels with ``make`` (``mx.fast.metal_kernel``'s signature) for the
    duration. Nothing of MLX is changed, and nothing of the product imports a simulator:
    the caller brings it (whether the dispatchers take the Metal path is still
    ``MLXKV_KERNELS``'s choice)."""
    _FACTORIES.append(make)
    try:
        yield make
    finally:
        _FACTORIES.remove(make)


def kernel(name: str, inputs: list[str], outputs: list[str], *, header: tuple[str, ...] = (),
           **options):
    """The kernel of ``metal_kernels/<name>.metal`` after the ``header`` files, in order,
    built once per source and per kernel factory (``factory()``: a simulator put in place
    gets its own build)."""
    make = factory()
    key = (name, tuple(inputs), tuple(outputs), header, id(make))
    built = _BUILT.get(key)
    if built is None or built[0] is not make:
        # `#line` names the header in compile errors, Apple's and the simulator's
        head = "".join(f'#line 1 "{h}"\n' + source(h) for h in header)
        fn = make(name=name, input_names=inputs, output_names=outputs,
                  source=source(f"{name}.metal"), header=head, **options)
        built = _BUILT[key] = (make, fn)
    return built[1]


# MLX binds an input of fewer elements than this in the ``constant`` address space; every
# kernel here reads its inputs through ``device`` pointers (helpers in kv_attention.h take
# ``const device T*``), which Apple's compiler refuses to bind to a ``constant`` pointer.
MIN_DEVICE_ELEMENTS = 8


def device_sized(x: mx.array) -> mx.array:
    """``x`` flattened and padded with zeros to ``MIN_DEVICE_ELEMENTS`` when smaller (the
    kernels index their inputs flat and never read the padding). A 0-d scalar stays: MLX
    binds it as a ``constant`` reference, which a kernel reads as a value."""
    if x.ndim == 0 or x.size >= MIN_DEVICE_ELEMENTS:
        return x
    return mx.concatenate([x.reshape(-1), mx.zeros((MIN_DEVICE_ELEMENTS - x.size,), x.dtype)])


_CHECKED: set = set()
_FAILED: dict[tuple, str] = {}  # instantiation -> why it was turned off


def instantiation(name: str, template) -> tuple:
    """What one compiled kernel is keyed by: its source and template values (the dtype
    among them). Inputs' ranks are fixed by each kernel's wrapper."""
    return _instantiation(name, tuple(template))


@lru_cache(maxsize=1024)
def _instantiation(name: str, template: tuple) -> tuple:
    return (name, repr(list(template)))


def failed(name: str, template) -> bool:
    """Whether this instantiation failed on this Metal device (its dispatcher then uses
    the reference; other instantiations of the kernel still run)."""
    return instantiation(name, template) in _FAILED


def launch(name: str, inputs_names: list[str], outputs: list[str], *, inputs, template,
           header: tuple[str, ...] = (), **call):
    """Launch ``metal_kernels/<name>.metal``; returns its outputs, or None if it failed.

    Apple's compiler only sees a kernel on the device, so in ``auto`` mode the first
    launch of each instantiation is evaluated at once (caches do it ahead, on tiny
    inputs: ``mlxkv.cache.fused.preflight``): an instantiation that does not compile or
    run there is turned off with a warning and the caller falls back to its reference
    (the answer stays right, only slower). With ``MLXKV_KERNELS=metal`` errors propagate.
    """
    inputs = [device_sized(x) for x in inputs]
    key = instantiation(name, template)
    forced = mode() == "metal"
    if key in _FAILED and not forced:
        return None
    if forced or key in _CHECKED:
        return kernel(name, inputs_names, outputs, header=header)(
            inputs=inputs, template=list(template), stream=mx.gpu, **call)
    try:
        outs = kernel(name, inputs_names, outputs, header=header)(
            inputs=inputs, template=list(template), stream=mx.gpu, **call)
        mx.eval(outs)
    except (RuntimeError, ValueError) as e:  # MLX raises both for kernels it cannot run
        _FAILED[key] = str(e)
        warnings.warn(f"mlxkv: Metal kernel {name} failed on this device and this "
                      f"instantiation {template_label(template)} is turned off "
                      f"(the reference path is used instead): {e}", RuntimeWarning, stacklevel=3)
        return None
    _CHECKED.add(key)
    return outs


def template_label(template) -> str:
    """``<T=float16, D=64, ...>``: template values as MLX's kernel names spell them."""
    def value(v):
        return str(v).split(".")[-1] if isinstance(v, mx.Dtype) else str(v)

    return "<" + ", ".join(f"{k}={value(v)}" for k, v in template) + ">" if template else "<>"
