"""Fused attention over a quantized KV cache (``metal_kernels/sdpa_quantized*.metal``).

The cache is a quantized ring (``QuantizedKV``: mlxkv's codec layouts, keys per token or
per channel, values per token, 2/3/4/8 bits) followed by full-precision tokens (sinks,
residual, and for a chunk of L > 1 queries the chunk itself, causal). The kernel unpacks
and dequantizes K and V as it goes with an online softmax: no dequantized copy of the
cache and no score matrix. One threadgroup serves all query heads of a GQA group (up to
``MAX_GROUP``), so each cache byte is read and dequantized once per group, not once per
query head. When there are too few (batch, group, row) threadgroups to fill the GPU the
tokens are split into blocks (a two-pass, split-K variant), as many as needed to reach
about ``TARGET_THREADGROUPS``. Rotated keys need nothing here: the cache rotates the query
once before calling.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import _metal
from .quantize_rows import BITS

SIMDGROUPS = 8         # simdgroups per threadgroup
MAX_GROUP = 8          # query heads one threadgroup serves (a divisor of the GQA ratio)
TARGET_THREADGROUPS = 128  # enough to fill a Mac's GPU: the split count aims at it
MIN_BLOCK = 256        # tokens per threadgroup, at least, when the cache is split
KERNELS = ("sdpa_quantized", "sdpa_quantized_pass1", "sdpa_quantized_pass2")


@dataclass(frozen=True)
class QuantizedKV:
    """A quantized ring as the cache stores it (whole allocated arrays, no slicing).

    keys: (w, scales, biases), per token: (B, H, A, D*bits/32), (B, H, A, D/group);
          per channel: (B, H, D, A*bits/32), (B, H, D, A/group).
    values: (w, scales, biases) per token. length: slots in use (<= A)."""
    keys: tuple
    values: tuple
    length: int
    key_bits: int
    key_group: int
    value_bits: int
    value_group: int
    key_mode: str = "token"

    @property
    def allocated(self) -> int:
        w = self.keys[0]
        return w.shape[2] if self.key_mode == "token" else w.shape[3] * 32 // self.key_bits

    def dequantized(self):
        """(keys, values) of the used slots at full precision (B, H, n, D)."""
        n = self.length
        kw, ks, kb = self.keys
        if self.key_mode == "token":
            k = mx.dequantize(kw[:, :, :n], ks[:, :, :n], kb[:, :, :n],
                              group_size=self.key_group, bits=self.key_bits)
        else:
            k = mx.dequantize(kw[..., : n * self.key_bits // 32], ks[..., : n // self.key_group],
                              kb[..., : n // self.key_group], group_size=self.key_group,
                              bits=self.key_bits).swapaxes(-1, -2)
        vw, vs, vb = self.values
        v = mx.dequantize(vw[:, :, :n], vs[:, :, :n], vb[:, :, :n],
                          group_size=self.value_group, bits=self.value_bits)
        return k, v


def _dims_ok(ring: QuantizedKV | None, q, fk, fv) -> bool:
    """Shapes, dtypes and alignments the kernels are written for: head dims a multiple of
    the simd width (each lane owns whole elements), one float dtype throughout, whole
    uint32 words per token (per channel: per group of tokens) and whole groups."""
    D, DV = q.shape[-1], fv.shape[-1]
    ok = D % 32 == 0 and DV % 32 == 0 and D <= 256 and DV <= 256 and fk.shape[-1] == D
    ok = ok and q.dtype in (mx.float16, mx.bfloat16, mx.float32) and q.shape[1] % fk.shape[1] == 0
    ok = ok and fk.dtype == q.dtype and fv.dtype == q.dtype and fk.shape[:3] == fv.shape[:3]
    if ring is None or not ok:
        return ok
    ok = ring.key_mode in ("token", "channel") and ring.key_bits in BITS and ring.value_bits in BITS
    ok = ok and all(a.dtype == q.dtype for a in (*ring.keys[1:], *ring.values[1:]))
    ok = ok and ring.keys[0].dtype == mx.uint32 and ring.values[0].dtype == mx.uint32
    ok = ok and D % ring.key_group == 0 and DV % ring.value_group == 0
    if ring.key_mode == "channel":  # tokens along the packed axis: whole groups and words
        A = ring.allocated
        ok = ok and A % ring.key_group == 0 and A * ring.key_bits % 32 == 0
    return ok


def group_size(q_heads: int, kv_heads: int) -> int:
    """Query heads per threadgroup: the largest divisor of the GQA ratio up to MAX_GROUP."""
    rep = q_heads // kv_heads
    return max(r for r in range(1, min(rep, MAX_GROUP) + 1) if rep % r == 0)


def split(q, fk, ring: QuantizedKV | None, passes=None) -> int:
    """Blocks the tokens are cut into (1: single pass): enough (batch, group, row, block)
    threadgroups to reach TARGET_THREADGROUPS, blocks of at least MIN_BLOCK tokens."""
    B, Hq, L, _ = q.shape
    tokens = (0 if ring is None else ring.length) + max(fk.shape[2], 1)
    groups = B * (Hq // group_size(Hq, fk.shape[1])) * L
    nb = max(1, min(-(-TARGET_THREADGROUPS // groups), -(-tokens // MIN_BLOCK)))
    if passes is not None:
        nb = 1 if passes == 1 else max(nb, 2)
    return nb


def _template(ring: QuantizedKV | None, q, DV: int, R: int, stats: bool) -> list:
    dt, D = q.dtype, q.shape[-1]
    if ring is None or ring.length == 0:  # no ring: any valid widths (nothing is read)
        kb_, vb_, kg, vg, kch = 4, 4, 32, 32, False
    else:
        kb_, vb_, kg, vg = ring.key_bits, ring.value_bits, ring.key_group, ring.value_group
        kch = ring.key_mode == "channel"
    return [("T", dt), ("D", D), ("DV", DV), ("KB", kb_), ("KG", kg), ("VB", vb_),
            ("VG", vg), ("KCH", kch), ("BN", SIMDGROUPS), ("R", R), ("STATS", bool(stats))]


def _plan(ring: QuantizedKV | None, q, fk, fv, stats: bool, passes=None) -> tuple[int, list]:
    """The token blocks of one call (``split``) and its (kernel, template) launches, in order."""
    template = _template(ring, q, fv.shape[-1], group_size(q.shape[1], fk.shape[1]), stats)
    nb = split(q, fk, ring, passes)
    if nb == 1:
        return nb, [("sdpa_quantized", template)]
    return nb, [("sdpa_quantized_pass1", template),
                ("sdpa_quantized_pass2", [("T", q.dtype), ("DV", fv.shape[-1]), ("STATS", bool(stats))])]


def sdpa_quantized_metal(q, *, scale, ring, float_keys, float_values, stats=False, passes=None):
    B, Hq, L, D = q.shape
    H, nf, DV = float_keys.shape[1], float_keys.shape[2], float_values.shape[3]
    dt = q.dtype
    if nf == 0:  # kernels take no empty buffers
        float_keys, float_values = mx.zeros((B, H, 1, D), dt), mx.zeros((B, H, 1, DV), dt)
    if ring is None or ring.length == 0:
        z = mx.zeros((1,), mx.uint32)
        zs = mx.zeros((1,), dt)
        keys, values, nq, alloc = (z, zs, zs), (z, zs, zs), 0, 0
    else:
        keys, values, nq, alloc = ring.keys, ring.values, ring.length, ring.allocated
    T = nq + nf
    rows = B * Hq * L
    groups = B * (Hq // group_size(Hq, H)) * L  # threadgroups per token block
    nb, plan = _plan(ring, q, float_keys, float_values, stats, passes)
    template = plan[0][1]
    inputs = [q, mx.array(scale, mx.float32), *keys, *values, float_keys, float_values]
    names = ["q", "scale", "kw", "ks", "kb", "vw", "vs", "vb", "kf", "vf", "dims"]
    score_shape = (B, Hq, L, T) if stats else (1,)
    if len(plan) == 1:
        outs = _metal.launch(
            "sdpa_quantized", names, ["out", "scores", "lse"], header="kv_attention.h",
            inputs=inputs + [mx.array([nq, alloc, nf, L, H, Hq], mx.int32)], template=template,
            grid=(32, SIMDGROUPS, groups), threadgroup=(32, SIMDGROUPS, 1),
            output_shapes=[(B, Hq, L, DV), score_shape, (B, Hq, L) if stats else (1,)],
            output_dtypes=[dt, mx.float32, mx.float32])
        if outs is None:
            return None
        out, scores, lse = outs
    else:
        bs = -(-T // nb)
        outs = _metal.launch(
            "sdpa_quantized_pass1", names, ["po", "pm", "pl", "scores"], header="kv_attention.h",
            inputs=inputs + [mx.array([nq, alloc, nf, L, H, Hq, nb, bs], mx.int32)],
            template=template, grid=(32, SIMDGROUPS, groups * nb), threadgroup=(32, SIMDGROUPS, 1),
            output_shapes=[(rows, nb, DV), (rows, nb), (rows, nb), score_shape],
            output_dtypes=[dt] + [mx.float32] * 3)  # partial outputs in the input dtype
        if outs is None:
            return None
        po, pm, pl, scores = outs
        outs = _metal.launch(
            "sdpa_quantized_pass2", ["po", "pm", "pl", "dims"], ["out", "lse"],
            inputs=[po, pm, pl, mx.array([nb], mx.int32)],
            template=plan[1][1], grid=(32, 1, rows), threadgroup=(32, 1, 1),
            output_shapes=[(B, Hq, L, DV), (B, Hq, L) if stats else (1,)],
            output_dtypes=[dt, mx.float32])
        if outs is None:
            return None
        out, lse = outs
    return (out, scores, lse) if stats else out


def sdpa_quantized_reference(q, *, scale, ring, float_keys, float_values, stats=False):
    B, Hq, L, D = q.shape
    H = float_keys.shape[1]
    nf = float_keys.shape[2]
    k, v = float_keys, float_values
    nq = 0 if ring is None else ring.length
    if nq:
        rk, rv = ring.dequantized()
        k, v = mx.concatenate([rk, k], axis=2), mx.concatenate([rv, v], axis=2)
    qf = (q.astype(mx.float32) * scale).reshape(B, H, Hq // H * L, D)
    s = (qf @ k.astype(mx.float32).swapaxes(-1, -2)).reshape(B, Hq, L, nq + nf)
    j = mx.arange(nq + nf) - nq
    visible = j[None, :] <= (nf - L + mx.arange(L))[:, None]
    s = mx.where(visible, s, -mx.inf)
    lse = mx.logsumexp(s, axis=-1)
    p = mx.exp(s - lse[..., None])
    p = mx.where(mx.isnan(p), 0.0, p)  # rows that see nothing
    out = (p.reshape(B, H, -1, nq + nf) @ v.astype(mx.float32)).reshape(B, Hq, L, -1).astype(q.dtype)
    return (out, s, lse) if stats else out


def fused_available(ring: QuantizedKV | None, q, float_keys, float_values, *,
                    stats: bool = False) -> bool:
    """Whether ``sdpa_quantized`` would run the Metal kernel for these arrays (callers
    with a faster non-Metal path of their own use it to choose): Metal is on, the shapes
    are supported, and none of the kernel instantiations it needs failed here."""
    # Per-channel (KIVI) keys are laid out along tokens: the kernel's lanes would read a
    # cache line per element. Until they get a coalesced layout they take the dispatcher's
    # reference (the cache's own path: MLX's quantized matmuls). ``sdpa_quantized_metal``
    # still runs them, for tests.
    if ring is not None and ring.length and ring.key_mode == "channel":
        return False
    return _metal.use_metal(_dims_ok(ring, q, float_keys, float_values)) and not any(
        _metal.failed(name, template)
        for name, template in _plan(ring, q, float_keys, float_values, stats)[1])


def sdpa_quantized(q: mx.array, *, scale: float, ring: QuantizedKV | None, float_keys: mx.array,
                   float_values: mx.array, stats: bool = False):
    """Attention of q (B, Hq, L, D) over ``ring`` then ``float_keys``/``float_values``
    (B, H, NF, D/DV; the last L are the queries' own tokens, causal) -> (B, Hq, L, DV).

    With ``stats`` also returns the scaled scores (B, Hq, L, NQ + NF) (-inf where a row
    cannot see a token) and each row's log-sum-exp (B, Hq, L), for ``attention_mass``."""
    if fused_available(ring, q, float_keys, float_values, stats=stats):
        out = sdpa_quantized_metal(q, scale=scale, ring=ring, float_keys=float_keys,
                                   float_values=float_values, stats=stats)
        if out is not None:
            return out
    return sdpa_quantized_reference(q, scale=scale, ring=ring, float_keys=float_keys,
                                    float_values=float_values, stats=stats)
