"""The two products of attention over codebook-coded keys and values
(``metal_kernels/codebook_scores.metal``, ``codebook_weighted.metal``), read straight
from the codes through the codebook (``mlxkv/cache/codebook.py``), with pure-MLX
references and dispatchers that fall back to them.

Shapes: B batch, H kv heads, M query rows per kv head, n slots, D head dim. ``planes`` are
the codes' bit planes (B, H, n, D * w / 32) uint32 for widths ``widths`` (low bits first),
``scale`` (B, H, n, 1) float16, ``levels`` (2^bits,) float32.
"""

from __future__ import annotations

import mlx.core as mx

from . import _metal

LEVELS = 16  # the codebook input is padded to this many entries (up to 4 bits)


def codes(planes, widths) -> mx.array:
    """The codes (B, H, n, D) uint32 from their bit planes."""
    out, low = None, 0
    for words, width in zip(planes, widths):
        per = 32 // width
        fields = (words[..., None] >> (mx.arange(per, dtype=mx.uint32) * width)) & ((1 << width) - 1)
        part = fields.reshape(*words.shape[:-1], -1) << low
        out = part if out is None else out | part
        low += width
    return out


def _launch(name: str, x: mx.array, x_name: str, out_name: str, planes, widths, scale, levels,
            *, cols: int):
    """Launch one of the two kernels on ``x`` (B, H, M, ...): (B, H, M, cols) in x's dtype."""
    B, H, M = x.shape[:3]
    n = scale.shape[2]
    D = planes[0].shape[-1] * 32 // widths[0]
    w1 = widths[1] if len(widths) > 1 else 0
    p1 = planes[1].reshape(B * H, n, -1) if w1 else mx.zeros((8,), mx.uint32)
    table = mx.concatenate([levels.astype(mx.float32), mx.zeros((LEVELS - levels.size,), mx.float32)])
    outs = _metal.launch(
        name, [x_name, "plane0", "plane1", "scale", "levels", "dims"], [out_name],
        inputs=[x.reshape(B * H, M, -1), planes[0].reshape(B * H, n, -1), p1,
                scale.reshape(B * H, n), table, mx.array([B * H, M, n], mx.int32)],
        template=[("T", x.dtype), ("D", D), ("W0", widths[0]), ("W1", w1)],
        grid=(cols, B * H * M, 1), threadgroup=(min(cols, 256), 1, 1),
        output_shapes=[(B, H, M, cols)], output_dtypes=[x.dtype])
    return None if outs is None else outs[0]


def codebook_scores_metal(*, q, planes, widths, scale, levels):
    """q (B, H, M, D) rotated -> scores (B, H, M, n) in q's dtype (None if it failed)."""
    return _launch("codebook_scores", q, "q", "scores", planes, widths, scale, levels,
                   cols=scale.shape[2])


def codebook_weighted_metal(*, p, planes, widths, scale, levels):
    """p (B, H, M, n) -> p @ values (B, H, M, D), rotated, in p's dtype (None if it failed)."""
    return _launch("codebook_weighted", p, "p", "out", planes, widths, scale, levels,
                   cols=planes[0].shape[-1] * 32 // widths[0])


def vectors_reference(*, planes, widths, scale, levels, dtype) -> mx.array:
    """The slots' vectors in the rotated space (B, H, n, D): a working block of the
    reference, never stored."""
    return (levels[codes(planes, widths)] * scale.astype(mx.float32)).astype(dtype)


def codebook_scores_reference(*, q, planes, widths, scale, levels):
    k = vectors_reference(planes=planes, widths=widths, scale=scale, levels=levels, dtype=q.dtype)
    return q @ k.swapaxes(-1, -2)


def codebook_weighted_reference(*, p, planes, widths, scale, levels):
    v = vectors_reference(planes=planes, widths=widths, scale=scale, levels=levels, dtype=p.dtype)
    return p @ v


def _supported(x, planes, scale) -> bool:
    return (x.dtype in (mx.float32, mx.float16, mx.bfloat16) and scale.shape[2] > 0
            and all(a.dtype == mx.uint32 for a in planes))


def _dispatch(metal, reference, **args):
    x = args.get("q", args.get("p"))
    if _metal.use_metal(_supported(x, args["planes"], args["scale"])):
        out = metal(**args)
        if out is not None:
            return out
    return reference(**args)


def codebook_scores(*, q, planes, widths, scale, levels):
    """Rotated queries (B, H, M, D) times the coded keys: (B, H, M, n)."""
    return _dispatch(codebook_scores_metal, codebook_scores_reference, q=q, planes=planes,
                     widths=widths, scale=scale, levels=levels)


def codebook_weighted(*, p, planes, widths, scale, levels):
    """Probabilities (B, H, M, n) times the coded values: (B, H, M, D), rotated."""
    return _dispatch(codebook_weighted_metal, codebook_weighted_reference, p=p, planes=planes,
                     widths=widths, scale=scale, levels=levels)
