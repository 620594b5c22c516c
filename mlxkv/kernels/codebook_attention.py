"""The two products of attention over codebook-coded keys and values
(``metal_kernels/codebook_scores.metal``, ``codebook_weighted.metal``), read straight
from the codes through the codebook (``mlxkv/cache/codebook.py``), with pure-MLX
references and dispatchers that fall back to them.

Shapes: B batch, H kv heads, M query rows per kv head, n slots, D head dim. ``planes`` are
the codes' bit planes (B, H, n, D * w / 32) uint32 for widths ``widths`` (low bits first),
``scale`` (B, H, n, 1) float16, ``levels`` (2^bits,) float32.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations

import mlx.core as mx
import numpy as np

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


# ----- the references ---------------------------------------------------------------------
# A table lookup per element (``levels[codes]``) is a gather, which MLX's CPU backend runs
# as its own pass over the cache, after the passes that unpack the codes. The references
# instead write the table as a sum over subsets S of the code's bits (its Walsh
# expansion): levels[c] = sum_S a_S * prod_{i in S} s_i, with s_i = +1 or -1 for bit i of
# c. A symmetric codebook (levels[~c] = -levels[c], as Lloyd-Max's are) has only odd
# subsets: 2 terms at 2 bits, 4 at 3 bits, 8 at 4 bits. That is elementwise arithmetic on
# the packed words, which ``mx.compile`` fuses into one pass; the codes never exist as an
# array and neither does a gather.


def walsh(levels: np.ndarray, bits: int) -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """(subsets, coefficients) of a table of 2^bits levels, zero terms left out."""
    c = np.arange(2 ** bits)
    s = [2.0 * ((c >> i) & 1) - 1.0 for i in range(bits)]
    subsets = [S for r in range(bits + 1) for S in combinations(range(bits), r)]
    coef = [float(np.mean(levels * np.prod([s[i] for i in S], axis=0))) for S in subsets]
    top = max(abs(a) for a in coef) or 1.0
    keep = [i for i, a in enumerate(coef) if abs(a) > 1e-7 * top]
    return tuple(subsets[i] for i in keep), np.array([coef[i] for i in keep], np.float32)


@lru_cache(maxsize=None)
def _expansion(widths: tuple[int, ...], subsets: tuple[tuple[int, ...], ...]):
    """A compiled elementwise function (words, words of a second plane, coefficients) ->
    the codes' table values. Its inputs are the planes' words shaped by ``_words`` so
    that every plane broadcasts to one (..., D / 32, A, F) grid of coordinates, and it
    reshapes nothing, so one compiled function serves every cache length."""
    bits = sum(widths)
    w0 = widths[0]
    per0 = 32 // w0

    def expand(words0, words1, coef):
        fields = words0 >> (mx.arange(per0, dtype=mx.uint32) * w0).reshape(1, per0)
        bit = [(fields >> i) & 1 for i in range(w0)]
        if len(widths) > 1:  # a 1-bit plane for the code's top bit
            bit.append((words1 >> mx.arange(32, dtype=mx.uint32).reshape(_grid(widths))) & 1)
        sign = [2.0 * b.astype(mx.float32) - 1.0 for b in bit[:bits]]
        products = {(i,): x for i, x in enumerate(sign)}  # of sign bits, shared prefixes once

        def product(S):
            if S not in products:
                products[S] = product(S[:-1]) * sign[S[-1]]
            return products[S]

        terms = [coef[j] * product(S) if S else coef[j] for j, S in enumerate(subsets)]
        while len(terms) > 1:  # summed as a balanced tree: a shallow graph fuses whole
            terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) // 2 * 2:]
        return terms[0]

    return mx.compile(expand, shapeless=True)


def _grid(widths) -> tuple[int, int]:
    """(A, F): a word's coordinates as A words of F fields of the first plane: one word
    of 32 / width fields, or (2-bit + 1-bit planes) the 32 coordinates of a 1-bit word
    as two 2-bit words of 16."""
    return (2, 16) if len(widths) > 1 else (1, 32 // widths[0])


def _words(planes, widths):
    """The planes' words shaped to broadcast over (..., D / 32, A, F)."""
    lead = planes[0].shape[:-1]
    A, F = _grid(widths)
    if len(widths) == 1:
        return planes[0].reshape(*lead, -1, 1, 1), mx.zeros((1,), mx.uint32)
    return planes[0].reshape(*lead, -1, A, 1), planes[1].reshape(*lead, -1, 1, 1)


@lru_cache(maxsize=None)
def _terms(levels: tuple[float, ...], bits: int) -> tuple[tuple, mx.array]:
    """``walsh`` of a table, once per table (the references run per layer and step)."""
    subsets, coef = walsh(np.array(levels, np.float64), bits)
    return subsets, mx.array(coef)


def unscaled_vectors(*, planes, widths, levels) -> mx.array:
    """levels[codes] (B, H, n, D) float32: the coded directions, before each slot's scale."""
    bits = sum(widths)
    subsets, coef = _terms(tuple(np.array(levels).tolist()[: 2 ** bits]), bits)
    words0, words1 = _words(planes, widths)
    out = _expansion(tuple(widths), subsets)(words0, words1, coef)
    return out.reshape(*planes[0].shape[:-1], -1)


def vectors_reference(*, planes, widths, scale, levels, dtype) -> mx.array:
    """The slots' vectors in the rotated space (B, H, n, D): a working block of the
    reference, never stored."""
    return (unscaled_vectors(planes=planes, widths=widths, levels=levels)
            * scale.astype(mx.float32)).astype(dtype)


def codebook_scores_reference(*, q, planes, widths, scale, levels):
    """Each slot's scale is applied to its column of scores, not to its D values."""
    k = unscaled_vectors(planes=planes, widths=widths, levels=levels).astype(q.dtype)
    return (q @ k.swapaxes(-1, -2)) * scale.swapaxes(-1, -2).astype(q.dtype)


def codebook_weighted_reference(*, p, planes, widths, scale, levels):
    """Each slot's scale is applied to its column of probabilities, not to its D values."""
    v = unscaled_vectors(planes=planes, widths=widths, levels=levels).astype(p.dtype)
    return (p * scale.swapaxes(-1, -2).astype(p.dtype)) @ v


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


def codebook_preflight(*, dtype: mx.Dtype, head_dim: int, widths) -> None:
    """Compile and run once, on tiny inputs, both kernels' instantiation for a codebook
    codec of bit planes ``widths`` and queries (so probabilities) of ``dtype`` and
    ``head_dim``, through the dispatchers as attention calls them: when a cache is made
    (as ``mlxkv.cache.fused.preflight`` does the affine kernels), not at its first decode
    step; one Apple's compiler rejects is turned off now (``_metal.launch``) and the
    reference used instead. Nothing to do without Metal."""
    if not _metal.use_metal(True):
        return
    args = dict(planes=[mx.zeros((1, 1, 1, head_dim * w // 32), mx.uint32) for w in widths],
                widths=tuple(widths), scale=mx.zeros((1, 1, 1, 1), mx.float16),
                levels=mx.zeros((2 ** sum(widths),), mx.float32))
    mx.eval(codebook_scores(q=mx.zeros((1, 1, 1, head_dim), dtype), **args),
            codebook_weighted(p=mx.zeros((1, 1, 1, 1), dtype), **args))
