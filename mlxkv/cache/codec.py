"""How one segment of keys or values is stored: full precision, affine-quantized, or as
codes of a codebook after a rotation (``codebook.py``).

A codec knows the storage layout of a run of cache slots and computes the two products
attention needs straight from that storage, so no dequantized copy of the cache is kept:
``scores`` (queries times keys transposed) and ``weighted`` (probabilities times values).

Layouts (B batch, H kv heads, n slots, D head dim, p = 32 // bits values per uint32):
- ``FloatCodec``: (B, H, n, D) in the cache dtype.
- ``AffineCodec(axis="token")``: each token's D values quantized in groups along D:
  packed (B, H, n, D / p) uint32, scales and biases (B, H, n, D / group).
- ``AffineCodec(axis="channel")`` (KIVI keys): each channel quantized in groups of
  ``group`` consecutive tokens, stored transposed: packed (B, H, D, n / p), scales and
  biases (B, H, D, n / group). Slots are written a whole group of tokens at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..kernels import quantize_rows
from .codebook import CodebookCodec
from ..kernels.quantize_rows import BITS, GROUP_SIZES  # noqa: F401  (what the kernels support)
DEFAULT_GROUP = 64


def default_group(head_dim: int) -> int | None:
    """The group size used when none is given: the largest supported group up to
    ``DEFAULT_GROUP`` that divides the head dim (64 for 64/128/256, 32 for 32/96/160),
    None when none does (e.g. 80)."""
    return next((g for g in sorted(GROUP_SIZES, reverse=True)
                 if g <= DEFAULT_GROUP and head_dim % g == 0), None)


@dataclass(frozen=True)
class FloatCodec:
    bits = None
    block = 1
    parts = 1  # arrays in the storage of a run of slots
    fusable = False  # the fused decode kernel reads it (as its ring)
    decodes_exactly = True  # its scores are those of its decoded keys

    def bytes_per_token(self, head_dim: int, dtype_size: int) -> float:
        """Bytes one token of one kv head takes."""
        return head_dim * dtype_size

    def alloc(self, B, H, n, D, dtype):
        return (mx.zeros((B, H, n, D), dtype),)

    def grow(self, state, extra):
        (x,) = state
        pad = mx.zeros((*x.shape[:2], extra, x.shape[3]), x.dtype)
        return (mx.concatenate([x, pad], axis=2),)

    def write(self, state, slot, x):
        self.store(state, slot, (x,), x.shape[2])

    def store(self, state, slot, parts, n):
        """Put ``parts`` (this codec's storage of n tokens) into slots ``slot .. slot + n``."""
        state[0][..., slot : slot + n, :] = parts[0]

    def encode(self, x):
        return (x,)

    def preflight(self, dtype, head_dim: int) -> None:
        """Compile what this codec's storage launches (nothing at full precision)."""

    def slots(self, state, n):
        return (state[0][..., :n, :],)

    def scores(self, q, state):
        return q @ state[0].swapaxes(-1, -2)

    def weighted(self, p, state):
        return p @ state[0]

    def decode(self, state):
        return state[0]


@dataclass(frozen=True)
class AffineCodec:
    bits: int
    group: int
    axis: str = "token"  # "token" or "channel"
    parts = 3  # packed values, scales, biases
    fusable = True
    decodes_exactly = True

    @property
    def block(self) -> int:
        return self.group if self.axis == "channel" else 1

    def bytes_per_token(self, head_dim: int, dtype_size: int) -> float:
        """Bytes one token of one kv head takes: codes, and a scale and bias per group."""
        return head_dim * self.bits / 8 + 2 * dtype_size * head_dim / self.group

    def alloc(self, B, H, n, D, dtype):
        if self.axis == "token":
            shape, qshape = (B, H, n, D * self.bits // 32), (B, H, n, D // self.group)
        else:  # n is a multiple of the group size
            shape, qshape = (B, H, D, n * self.bits // 32), (B, H, D, n // self.group)
        return (mx.zeros(shape, mx.uint32), mx.zeros(qshape, dtype), mx.zeros(qshape, dtype))

    def grow(self, state, extra):
        if self.axis == "token":
            sizes, axis = (extra, extra, extra), 2
        else:
            sizes, axis = (extra * self.bits // 32, extra // self.group, extra // self.group), 3
        out = []
        for a, n in zip(state, sizes):
            shape = list(a.shape)
            shape[axis] = n
            out.append(mx.concatenate([a, mx.zeros(shape, a.dtype)], axis=axis))
        return tuple(out)

    def encode(self, x):
        """x (B, H, n, D) float -> the codec's storage for those n tokens."""
        rows = x if self.axis == "token" else x.swapaxes(-1, -2)
        return quantize_rows(rows, bits=self.bits, group_size=self.group)

    def write(self, state, slot, x):
        self.store(state, slot, self.encode(x), x.shape[2])

    def preflight(self, dtype, head_dim: int) -> None:
        """Compile the quantizer this codec launches (``quantize_rows``), on one block."""
        mx.eval(self.encode(mx.zeros((1, 1, self.block, head_dim), dtype)))

    def store(self, state, slot, parts, n):
        w, s, b = parts
        if self.axis == "token":
            for dst, src in zip(state, (w, s, b)):
                dst[..., slot : slot + n, :] = src
        else:
            ws, we = slot * self.bits // 32, (slot + n) * self.bits // 32
            gs, ge = slot // self.group, (slot + n) // self.group
            state[0][..., ws:we] = w
            state[1][..., gs:ge] = s
            state[2][..., gs:ge] = b

    def slots(self, state, n):
        if self.axis == "token":
            return tuple(a[..., :n, :] for a in state)
        w, s, b = state
        return (w[..., : n * self.bits // 32], s[..., : n // self.group], b[..., : n // self.group])

    def scores(self, q, state):
        return mx.quantized_matmul(q, *state, transpose=self.axis == "token",
                                   group_size=self.group, bits=self.bits)

    def weighted(self, p, state):
        if self.axis != "token":
            raise ValueError("values are quantized per token")
        return mx.quantized_matmul(p, *state, transpose=False, group_size=self.group,
                                   bits=self.bits)

    def decode(self, state):
        x = mx.dequantize(*state, group_size=self.group, bits=self.bits)
        return x if self.axis == "token" else x.swapaxes(-1, -2)


FLOAT = FloatCodec()


def encode_pair(key_codec, value_codec, keys: mx.array, values: mx.array) -> tuple[tuple, tuple]:
    """The storage of the same tokens' keys and values: one quantizer launch for both
    when they share a codec and a shape (rows are quantized one by one, so the codes are
    those two calls would give), else one each."""
    same = (key_codec == value_codec and key_codec.bits is not None and key_codec.axis == "token"
            and keys.shape == values.shape and keys.dtype == values.dtype)
    if not same:
        return key_codec.encode(keys), value_codec.encode(values)
    both = key_codec.encode(mx.concatenate([keys, values], axis=0))
    B = keys.shape[0]
    return tuple(a[:B] for a in both), tuple(a[B:] for a in both)


QUANTS = ("affine", "codebook")


def make_codec(bits: int | None, group_size: int, axis: str = "token", quant: str = "affine",
               sketch: bool = False, outliers: int = 0):
    """Full precision without bits; else affine ``bits``-bit groups of ``group_size``, or
    (``quant="codebook"``, per token) ``CodebookCodec`` (``sketch``: with the residual's
    sign sketch; ``outliers``: that many values per vector kept exactly; both for keys)."""
    if bits is None:
        return FLOAT
    if quant == "codebook":
        return CodebookCodec(bits=bits, sketch=sketch, outliers=outliers)
    return AffineCodec(bits=bits, group=group_size, axis=axis)
