"""Affine quantization of rows into the packed layout (``metal_kernels/quantize_rows.metal``).

The layout is that of ``mx.quantize``, which is the reference. The rounding is that of
MLX's CPU ``mx.quantize`` (the group's min and max from its values, the edge of larger
magnitude represented exactly, ``rint``), not of its GPU kernel (which starts the max at
0 and rounds half away from zero): on the CPU simulator the codes equal the reference's,
on a Mac tests compare dequantized values within one quantization step instead."""

from __future__ import annotations

import mlx.core as mx

from . import _metal

QUANTIZE_SIMDGROUPS = 8  # (row, group) pairs per threadgroup, at most (the kernel's QB)
BITS = (2, 3, 4, 8)        # bit widths mlxkv quantizes K/V to (declared here, once)
GROUP_SIZES = (32, 64, 128)  # group sizes, as mx.quantize supports them


def quantize_rows_metal(x: mx.array, *, bits: int, group_size: int):
    """x (..., DX) float -> (w (..., DX * bits / 32) uint32, scales, biases (..., DX / group))."""
    *lead, dx = x.shape
    n = 1
    for s in lead:
        n *= s
    groups = dx // group_size
    pairs = n * groups  # one simdgroup each
    outs = _metal.launch(
        "quantize_rows", ["x", "dims"], ["w", "scales", "biases"], header=("affine.h",),
        inputs=[x.reshape(n, dx), mx.array([n, dx], mx.int32)],
        template=[("T", x.dtype), ("BITS", bits), ("G", group_size), ("QB", QUANTIZE_SIMDGROUPS)],
        grid=(32, pairs, 1), threadgroup=(32, min(pairs, QUANTIZE_SIMDGROUPS), 1),
        output_shapes=[(n, dx * bits // 32), (n, groups), (n, groups)],
        output_dtypes=[mx.uint32, x.dtype, x.dtype])
    if outs is None:
        return None
    w, s, b = outs
    return (w.reshape(*lead, -1), s.reshape(*lead, groups), b.reshape(*lead, groups))


def quantize_rows_reference(x: mx.array, *, bits: int, group_size: int):
    return mx.quantize(x, group_size=group_size, bits=bits)


def supported(x: mx.array, bits: int, group_size: int) -> bool:
    return (bits in BITS and group_size in GROUP_SIZES and x.shape[-1] % group_size == 0
            and x.dtype in (mx.float16, mx.bfloat16, mx.float32) and x.size > 0)


def quantize_rows(x: mx.array, *, bits: int, group_size: int):
    """Quantize the last axis of ``x`` in groups: Metal kernel or ``mx.quantize``."""
    if _metal.use_metal(supported(x, bits, group_size)):
        out = quantize_rows_metal(x, bits=bits, group_size=group_size)
        if out is not None:
            return out
    return quantize_rows_reference(x, bits=bits, group_size=group_size)
