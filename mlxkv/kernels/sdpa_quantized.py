"""Fused attention over a quantized KV cache (``metal_kernels/sdpa_quantized*.metal``).

The cache is a quantized ring (``QuantizedKV``: mlxkv's codec layouts, keys per token or
per channel, values per token, 2/3/4/8 bits) followed by full-precision tokens: optional
``sinks`` (read where they are, not joined to the rest), then the residual and, for a
chunk of L > 1 queries, the chunk itself (causal). The kernel unpacks
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
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx

from . import _metal
from .quantize_rows import BITS, GROUP_SIZES

SIMDGROUPS = 8         # simdgroups per threadgroup
MAX_GROUP = 8          # query heads one threadgroup serves (a divisor of the GQA ratio)
TARGET_THREADGROUPS = 128  # enough to fill a Mac's GPU: the split count aims at it
MIN_BLOCK = 256        # tokens per threadgroup, at least, when the cache is split
MAX_BLOCK = 4096       # and at most, unless one pass is asked for
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


def _dims_ok(ring: QuantizedKV | None, q, fk, fv, sinks=None) -> bool:
    """Shapes, dtypes and alignments the kernels are written for: head dims a multiple of
    the simd width (each lane owns whole elements: D = 80 falls back), one float dtype
    throughout, whole uint32 words per token (per channel: per group of tokens), whole
    groups of MLX's sizes (at least the D / 32 <= 8 elements a lane owns, so a lane's
    elements fall in two groups at most, as for D = 96, 160, 192). The one place that
    decides whether the kernels take a layout (``fused_available``)."""
    D, DV = q.shape[-1], fv.shape[-1]
    ok = D % 32 == 0 and DV % 32 == 0 and D <= 256 and DV <= 256 and fk.shape[-1] == D
    ok = ok and q.dtype in (mx.float16, mx.bfloat16, mx.float32) and q.shape[1] % fk.shape[1] == 0
    ok = ok and fk.dtype == q.dtype and fv.dtype == q.dtype and fk.shape[:3] == fv.shape[:3]
    if sinks is not None:
        sk, sv = sinks
        ok = ok and sk.dtype == q.dtype and sv.dtype == q.dtype and sk.shape[:3] == sv.shape[:3]
        ok = ok and sk.shape[:2] == fk.shape[:2] and sk.shape[3] == D and sv.shape[3] == DV
    if ring is None or not ok:
        return ok
    ok = ring.key_mode in ("token", "channel") and ring.key_bits in BITS and ring.value_bits in BITS
    ok = ok and all(a.dtype == q.dtype for a in (*ring.keys[1:], *ring.values[1:]))
    ok = ok and ring.keys[0].dtype == mx.uint32 and ring.values[0].dtype == mx.uint32
    ok = ok and ring.key_group in GROUP_SIZES and ring.value_group in GROUP_SIZES
    ok = ok and D % ring.key_group == 0 and DV % ring.value_group == 0
    if ring.key_mode == "channel":  # tokens along the packed axis: whole groups and words
        A = ring.allocated
        ok = ok and A % ring.key_group == 0 and A * ring.key_bits % 32 == 0
    return ok


def group_size(q_heads: int, kv_heads: int) -> int:
    """Query heads per threadgroup: the largest divisor of the GQA ratio up to MAX_GROUP."""
    rep = q_heads // kv_heads
    return max(r for r in range(1, min(rep, MAX_GROUP) + 1) if rep % r == 0)


def split(q, fk, ring: QuantizedKV | None, passes=None, sinks: int = 0) -> int:
    """Blocks the tokens are cut into (1: single pass): enough (batch, group, row, block)
    threadgroups to reach TARGET_THREADGROUPS, blocks of at least MIN_BLOCK tokens, and
    of at most MAX_BLOCK (a threadgroup's share of a long cache, and the length of its
    running float32 sums, stay bounded)."""
    B, Hq, L, _ = q.shape
    tokens = (0 if ring is None else ring.length) + sinks + max(fk.shape[2], 1)
    groups = B * (Hq // group_size(Hq, fk.shape[1])) * L
    nb = max(1, min(-(-TARGET_THREADGROUPS // groups), -(-tokens // MIN_BLOCK)),
             -(-tokens // MAX_BLOCK))
    if passes is not None:
        nb = 1 if passes == 1 else max(nb, 2)
    return nb


@dataclass(frozen=True)
class NewToken:
    """A decode step's new token, which the kernel quantizes itself (no quantizer launch):
    it takes ring slot ``slot`` (B, H) int32 (< the ring's ``length``; whatever is stored
    there is not read), is attended as its codes read back, and its codes come out
    (``Fused.new_keys``/``new_values``) for the cache to store. Per-token affine codecs,
    one query row. keys (B, H, 1, D), values (B, H, 1, DV) at full precision."""
    keys: mx.array
    values: mx.array
    slot: mx.array


class Fused(NamedTuple):
    """What one fused attention call gives: the output (B, Hq, L, DV); with ``mass_rows``
    the attention mass (B, H, NQ + NF) each token got from those query rows, summed over
    the query heads of its kv head (else None); with ``new`` the new token's storage,
    (w, scales, biases) each (B, H, 1, ..), for keys and values (else None)."""
    out: mx.array
    mass: mx.array | None = None
    new_keys: tuple | None = None
    new_values: tuple | None = None


def _template(ring: QuantizedKV | None, q, DV: int, R: int, stats: bool, new: bool) -> tuple:
    if ring is None or ring.length == 0:  # no ring: any valid widths (nothing is read)
        widths = (4, 32, 4, 32, False)
    else:
        widths = (ring.key_bits, ring.key_group, ring.value_bits, ring.value_group,
                  ring.key_mode == "channel")
    return _template_of(q.dtype, q.shape[-1], DV, widths, R, bool(stats), bool(new))


@lru_cache(maxsize=256)
def _template_of(dt, D: int, DV: int, widths: tuple, R: int, stats: bool, new: bool) -> tuple:
    """The attention kernels' template values (one tuple per instantiation, built once)."""
    kb_, kg, vb_, vg, kch = widths
    return (("T", dt), ("D", D), ("DV", DV), ("KB", kb_), ("KG", kg), ("VB", vb_),
            ("VG", vg), ("KCH", kch), ("BN", SIMDGROUPS), ("R", R), ("STATS", stats),
            ("NEW", new))


@lru_cache(maxsize=64)
def _pass2_template(dt, DV: int, R: int, stats: bool) -> tuple:
    return (("T", dt), ("DV", DV), ("R", R), ("STATS", stats))


def _plan(ring: QuantizedKV | None, q, fk, fv, stats: bool, passes=None,
          new: bool = False, sinks: int = 0) -> tuple[int, list]:
    """The token blocks of one call (``split``) and its (kernel, template) launches, in order."""
    R = group_size(q.shape[1], fk.shape[1])
    template = _template(ring, q, fv.shape[-1], R, stats, new)
    nb = split(q, fk, ring, passes, sinks)
    if nb == 1:
        return nb, [("sdpa_quantized", template)]
    return nb, [("sdpa_quantized_pass1", template),
                ("sdpa_quantized_pass2", _pass2_template(q.dtype, fv.shape[-1], R, bool(stats)))]


def _mass(mass: mx.array, kv_heads: int, rows: tuple[int, int]) -> mx.array:
    """The kernel's mass per (batch, group of R heads, row) (B, Hq / R, L, T) -> the mass
    from ``rows`` per kv head (B, H, T) (a reshape for a decode step with R = Hq / H)."""
    B, groups, L, T = mass.shape
    if groups == kv_heads and rows == (0, L) and L == 1:
        return mass.reshape(B, kv_heads, T)
    m = mass.reshape(B, kv_heads, groups // kv_heads, L, T)
    return m[:, :, :, rows[0] : rows[1]].sum(axis=(2, 3))


@lru_cache(maxsize=16)
def _scalar(value: float) -> mx.array:
    return mx.array(value, mx.float32)


@lru_cache(maxsize=16)
def _dummy(dtype) -> mx.array:
    """Zeros for an input a call does not read: built once per dtype, not per call, and
    large enough never to be padded (``_metal.device_sized``)."""
    return mx.zeros((_metal.MIN_DEVICE_ELEMENTS,), dtype)


def sdpa_quantized_metal(q, *, scale, ring, float_keys, float_values, mass_rows=None,
                         new: NewToken | None = None, sinks=None, passes=None) -> Fused | None:
    """The Metal kernels (None if an instantiation failed on this device just now)."""
    B, Hq, L, D = q.shape
    H, nr, DV = float_keys.shape[1], float_keys.shape[2], float_values.shape[3]
    ns = 0 if sinks is None else sinks[0].shape[2]
    nf = ns + nr
    dt = q.dtype
    stats = mass_rows is not None
    if new is not None and (L != 1 or ring is None or ring.key_mode != "token"):
        raise ValueError("a new token is quantized in the kernel for one query row over "
                         "a ring with per-token keys")
    nb, plan = _plan(ring, q, float_keys, float_values, stats, passes, new is not None, ns)
    # kernels take no empty buffers: an empty part is a dummy never read
    sink_keys, sink_values = (sinks if ns else (_dummy(dt), _dummy(dt)))
    if nr == 0:
        float_keys, float_values = _dummy(dt), _dummy(dt)
    if ring is None or ring.length == 0:
        z, zs = _dummy(mx.uint32), _dummy(dt)
        keys, values, nq, alloc = (z, zs, zs), (z, zs, zs), 0, 0
    else:
        keys, values, nq, alloc = ring.keys, ring.values, ring.length, ring.allocated
    T = nq + nf
    rows = B * Hq * L
    R = group_size(Hq, H)
    groups = B * (Hq // R) * L  # threadgroups per token block
    template = plan[0][1]
    if new is not None:
        extra = [new.keys, new.values, new.slot.astype(mx.int32)]
        kc, vc = (D * ring.key_bits // 32, D // ring.key_group), (DV * ring.value_bits // 32, DV // ring.value_group)
        new_shapes = [(B * H, kc[0]), (B * H, kc[1]), (B * H, kc[1]),
                      (B * H, vc[0]), (B * H, vc[1]), (B * H, vc[1])]
    else:
        extra = [_dummy(dt), _dummy(dt), _dummy(mx.int32)]
        new_shapes = [(1,)] * 6
    new_dtypes = [mx.uint32, dt, dt] * 2
    inputs = [q, _scalar(float(scale)), *keys, *values, sink_keys, sink_values, float_keys,
              float_values, *extra]
    names = ["q", "scale", "kw", "ks", "kb", "vw", "vs", "vb", "kf", "vf", "kr", "vr", "kn", "vn",
             "nslot", "dims"]
    new_names = ["nkw", "nks", "nkb", "nvw", "nvs", "nvb"]
    header = ("affine.h", "kv_attention.h")
    score_shape = (B, Hq, L, T) if stats else (1,)
    mass_shape = (B, Hq // R, L, T) if stats else (1,)
    if len(plan) == 1:
        outs = _metal.launch(
            "sdpa_quantized", names, ["out", "mass", "scores", *new_names], header=header,
            inputs=inputs + [mx.array([nq, alloc, ns, nr, L, H, Hq], mx.int32)], template=template,
            grid=(32, SIMDGROUPS, groups), threadgroup=(32, SIMDGROUPS, 1),
            output_shapes=[(B, Hq, L, DV), mass_shape, score_shape, *new_shapes],
            output_dtypes=[dt, mx.float32, mx.float32, *new_dtypes])
        if outs is None:
            return None
        out, mass, _, *coded = outs
    else:
        bs = -(-T // nb)
        outs = _metal.launch(
            "sdpa_quantized_pass1", names, ["po", "pm", "pl", "scores", *new_names],
            header=header, inputs=inputs + [mx.array([nq, alloc, ns, nr, L, H, Hq, nb, bs], mx.int32)],
            template=template, grid=(32, SIMDGROUPS, groups * nb), threadgroup=(32, SIMDGROUPS, 1),
            output_shapes=[(rows, nb, DV), (rows, nb), (rows, nb), score_shape, *new_shapes],
            output_dtypes=[dt] + [mx.float32] * 3 + new_dtypes)  # normalized partials in dtype
        if outs is None:
            return None
        po, pm, pl, scores, *coded = outs
        outs = _metal.launch(
            "sdpa_quantized_pass2", ["po", "pm", "pl", "scores", "dims"], ["out", "mass"],
            header=header, inputs=[po, pm, pl, scores, mx.array([nb, L, Hq, T], mx.int32)],
            template=plan[1][1], grid=(32, R, groups), threadgroup=(32, R, 1),
            output_shapes=[(B, Hq, L, DV), mass_shape], output_dtypes=[dt, mx.float32])
        if outs is None:
            return None
        out, mass = outs
    result = Fused(out, _mass(mass, H, mass_rows) if stats else None)
    if new is not None:
        parts = [c.reshape(B, H, 1, -1) for c in coded]
        result = result._replace(new_keys=tuple(parts[:3]), new_values=tuple(parts[3:]))
    return result


def _with_new(ring: QuantizedKV, new: NewToken) -> tuple[QuantizedKV, tuple, tuple]:
    """``ring`` with ``new`` quantized (``mx.quantize``) into its slot, and its storage."""
    coded_k = mx.quantize(new.keys, group_size=ring.key_group, bits=ring.key_bits)
    coded_v = mx.quantize(new.values, group_size=ring.value_group, bits=ring.value_bits)

    def put(parts, coded):
        out = []
        for a, c in zip(parts, coded):
            if a.shape[2] < ring.length:  # the new slot is past the storage's end
                a = mx.concatenate([a, mx.zeros((*a.shape[:2], ring.length - a.shape[2], a.shape[3]),
                                                a.dtype)], axis=2)
            at = mx.broadcast_to(new.slot.astype(mx.int32)[..., None, None], c.shape)
            out.append(mx.put_along_axis(a, at, c, axis=2))
        return tuple(out)

    ring = QuantizedKV(keys=put(ring.keys, coded_k), values=put(ring.values, coded_v),
                       length=ring.length, key_bits=ring.key_bits, key_group=ring.key_group,
                       value_bits=ring.value_bits, value_group=ring.value_group)
    return ring, coded_k, coded_v


def sdpa_quantized_reference(q, *, scale, ring, float_keys, float_values, mass_rows=None,
                             new: NewToken | None = None, sinks=None) -> Fused:
    B, Hq, L, D = q.shape
    if sinks is not None:
        float_keys = mx.concatenate([sinks[0], float_keys], axis=2)
        float_values = mx.concatenate([sinks[1], float_values], axis=2)
    H = float_keys.shape[1]
    nf = float_keys.shape[2]
    coded = (None, None)
    if new is not None:
        ring, *coded = _with_new(ring, new)
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
    mass = None
    if mass_rows is not None:
        lo, hi = mass_rows
        mass = p[:, :, lo:hi].reshape(B, H, Hq // H, hi - lo, nq + nf).sum(axis=(2, 3))
    return Fused(out, mass, *coded)


def fused_available(ring: QuantizedKV | None, q, float_keys, float_values, *,
                    stats: bool = False, new: bool = False, sinks=None) -> bool:
    """Whether ``sdpa_quantized`` would run the Metal kernel for these arrays (callers
    with a faster non-Metal path of their own use it to choose): Metal is on, the shapes
    are supported, and none of the kernel instantiations it needs failed here."""
    # Per-channel (KIVI) keys are laid out along tokens: the kernel's lanes would read a
    # cache line per element. Until they get a coalesced layout they take the dispatcher's
    # reference (the cache's own path: MLX's quantized matmuls). ``sdpa_quantized_metal``
    # still runs them, for tests.
    if ring is not None and ring.length and ring.key_mode == "channel":
        return False
    ns = 0 if sinks is None else sinks[0].shape[2]
    return _metal.use_metal(_dims_ok(ring, q, float_keys, float_values, sinks)) and not any(
        _metal.failed(name, template)
        for name, template in _plan(ring, q, float_keys, float_values, stats, new=new, sinks=ns)[1])


def sdpa_quantized(q: mx.array, *, scale: float, ring: QuantizedKV | None, float_keys: mx.array,
                   float_values: mx.array, mass_rows: tuple[int, int] | None = None):
    """Attention of q (B, Hq, L, D) over ``ring`` then ``float_keys``/``float_values``
    (B, H, NF, D/DV; the last L are the queries' own tokens, causal) -> (B, Hq, L, DV).

    With ``mass_rows`` (start, stop) also returns the attention mass (B, H, NQ + NF) each
    token got from those query rows, summed over the query heads of each kv head (what
    eviction policies learn from), reduced in the same launches: ``(out, mass)``."""
    stats = mass_rows is not None
    args = dict(scale=scale, ring=ring, float_keys=float_keys, float_values=float_values,
                mass_rows=mass_rows)
    got = None
    if fused_available(ring, q, float_keys, float_values, stats=stats):
        got = sdpa_quantized_metal(q, **args)
    if got is None:
        got = sdpa_quantized_reference(q, **args)
    return (got.out, got.mass) if stats else got.out
