"""``mlxkv bench --kernels``: fused attention over a quantized cache against
``mx.fast.scaled_dot_product_attention`` over fp16 K/V, one decode query, cache lengths
from 1k to 32k tokens, same process, ratios printed (> 1: the fused kernel is faster).

It needs a Metal device (a Mac). ``--simulate`` runs it on the CPU simulator of Metal
instead: the outputs are checked the same way but the timings mean nothing.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx

from .errors import InputError
from .kernels import QuantizedKV, quantize_rows, sdpa_quantized
from .kernels import _metal
from .kernels._metal import kernel_factory
from .kernels.sdpa_quantized import fused_available, sdpa_quantized_reference


KERNEL_TOLERANCE = 1e-2  # max |fused - reference| for fp16 outputs of order 1
NEEDS_METAL = ("mlxkv bench --kernels needs a Metal device (a Mac with Apple silicon); on other "
               "machines add --simulate to check the kernels on the CPU simulator (timings then "
               "mean nothing)")


@dataclass
class KernelRow:
    length: int
    sdpa_ms: float         # mx.fast.scaled_dot_product_attention, fp16 K/V (median)
    fused_ms: float        # mlxkv fused kernel over the quantized cache (median)
    speedup: float         # sdpa_ms / fused_ms
    fp16_kv_mb: float
    quantized_kv_mb: float
    max_error: float       # fused kernel vs its float32 reference on the same codes
    quantization_error: float  # fused kernel vs fp16 SDPA (what the bits cost)


def _decode_case(n: int, *, q_heads: int, kv_heads: int, head_dim: int, bits: int,
                 group_size: int, dtype, seed: int, quantize):
    """One decode query over a random cache of ``n`` tokens, evaluated: (q, k, v, the
    ring ``quantize`` made of k and v, no float tokens)."""
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((1, q_heads, 1, head_dim), key=k1).astype(dtype)
    k = mx.random.normal((1, kv_heads, n, head_dim), key=k2).astype(dtype)
    v = mx.random.normal((1, kv_heads, n, head_dim), key=k3).astype(dtype)
    ring = QuantizedKV(keys=quantize(k, bits=bits, group_size=group_size),
                       values=quantize(v, bits=bits, group_size=group_size), length=n,
                       key_bits=bits, key_group=group_size, value_bits=bits,
                       value_group=group_size)
    empty = mx.zeros((1, kv_heads, 0, head_dim), dtype)
    mx.eval(q, k, v, *ring.keys, *ring.values)
    return q, k, v, ring, empty


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@contextlib.contextmanager
def simulated(simulator=None):
    """Route mlxkv's kernels to the CPU simulator of Metal (``simulator``, or a default
    one) for the duration, on their Metal path (``MLXKV_KERNELS=metal``)."""
    from .metalsim import Simulator

    mode = os.environ.get("MLXKV_KERNELS")
    os.environ["MLXKV_KERNELS"] = "metal"
    try:
        with kernel_factory((simulator or Simulator()).metal_kernel):
            yield
    finally:
        if mode is None:
            os.environ.pop("MLXKV_KERNELS", None)
        else:
            os.environ["MLXKV_KERNELS"] = mode


def run_kernel_bench(*, lengths, bits: int = 4, group_size: int = 64, q_heads: int = 9,
                     kv_heads: int = 3, head_dim: int = 64, repeats: int = 20,
                     dtype=mx.float16, log=print) -> list[KernelRow]:
    if q_heads % kv_heads:
        raise InputError(f"--kernel-heads: {q_heads} query heads are not a multiple of {kv_heads} kv heads")
    if head_dim % group_size:
        raise InputError(f"head dim {head_dim} is not a multiple of the group size {group_size}")
    rows = []
    scale = head_dim ** -0.5
    for n in lengths:
        q, k, v, ring, empty = _decode_case(n, q_heads=q_heads, kv_heads=kv_heads,
                                            head_dim=head_dim, bits=bits, group_size=group_size,
                                            dtype=dtype, seed=n, quantize=quantize_rows)
        if not fused_available(ring, q, empty, empty):
            raise InputError(NEEDS_METAL)
        fused = lambda: sdpa_quantized(q, scale=scale, ring=ring, float_keys=empty,  # noqa: E731
                                       float_values=empty)
        base = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
        out, want = fused(), base()
        if not fused_available(ring, q, empty, empty):
            raise InputError("the fused kernel failed on this device: "
                             + "; ".join(_metal._FAILED.values()))
        ref = sdpa_quantized_reference(q, scale=scale, ring=ring, float_keys=empty,
                                       float_values=empty).out
        err = mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max().item()
        qerr = mx.abs(out.astype(mx.float32) - want.astype(mx.float32)).max().item()
        sdpa_ms, fused_ms = _median_ms(base, repeats), _median_ms(fused, repeats)
        row = KernelRow(length=n, sdpa_ms=sdpa_ms, fused_ms=fused_ms, speedup=sdpa_ms / fused_ms,
                        fp16_kv_mb=(k.nbytes + v.nbytes) / 1e6,
                        quantized_kv_mb=sum(a.nbytes for a in (*ring.keys, *ring.values)) / 1e6,
                        max_error=err, quantization_error=qerr)
        rows.append(row)
        log(format_kernel_row(row))
    return rows


KERNEL_HEADER = (f"{'tokens':>7} {'sdpa fp16 ms':>12} {'fused ms':>9} {'x sdpa':>7} "
                 f"{'fp16 KV MB':>10} {'quant KV MB':>11} {'max err':>9} {'vs fp16':>8}")


def format_kernel_row(r: KernelRow) -> str:
    return (f"{r.length:7d} {r.sdpa_ms:12.3f} {r.fused_ms:9.3f} {r.speedup:7.2f} "
            f"{r.fp16_kv_mb:10.2f} {r.quantized_kv_mb:11.2f} {r.max_error:9.2e} "
            f"{r.quantization_error:8.2e}")


def supported_on_this_machine() -> bool:
    return _metal.use_metal(True)


# ----- device traffic on the simulator (--simulate) -------------------------------------
@dataclass
class TrafficRow:
    gqa: int               # query heads per kv head
    length: int            # cache tokens
    packed_mb: float       # the quantized K/V the decode step attends over
    read_mb: float         # device bytes all its launches read (each byte once per threadgroup)
    ratio: float           # read / packed: 1 when every cache byte is read once
    launches: int          # kernel launches of the attention call
    mass_ratio: float      # read / packed when the call also reduces the attention mass
    mass_launches: int     # (a scoring policy's decode step) and its launches


TRAFFIC_HEADER = (f"{'gqa':>4} {'tokens':>7} {'packed KV MB':>12} {'read MB':>8} "
                  f"{'read/packed':>11} {'launches':>8} {'+mass r/p':>9} {'launches':>8}")


def format_traffic_row(r: TrafficRow) -> str:
    return (f"{r.gqa:4d} {r.length:7d} {r.packed_mb:12.3f} {r.read_mb:8.3f} {r.ratio:11.2f} "
            f"{r.launches:8d} {r.mass_ratio:9.2f} {r.mass_launches:8d}")


def run_traffic_bench(*, lengths, ratios=(1, 3, 4, 8), bits: int = 4, group_size: int = 64,
                      head_dim: int = 64, dtype=mx.float16, log=print) -> list[TrafficRow]:
    """Device bytes one decode query's fused attention reads, per GQA ratio and cache
    length, on the profiling simulator (one kv head: the figure is per kv head)."""
    from .metalsim import Simulator

    sim = Simulator(profile=True)
    rows = []
    with simulated(sim):
        for r in ratios:
            for n in lengths:
                # mx.quantize: the quantizer is not what is measured (nor simulated)
                q, _, _, ring, empty = _decode_case(
                    n, q_heads=r, kv_heads=1, head_dim=head_dim, bits=bits,
                    group_size=group_size, dtype=dtype, seed=n + r, quantize=mx.quantize)
                packed = sum(a.nbytes for a in (*ring.keys, *ring.values))
                counts = []
                for rows_ in (None, (0, 1)):  # plain; with a scoring policy's attention mass
                    before = len(sim.traffic)
                    mx.eval(sdpa_quantized(q, scale=head_dim ** -0.5, ring=ring, float_keys=empty,
                                           float_values=empty, mass_rows=rows_))
                    launches = sim.traffic[before:]
                    counts.append((sum(sum(t.read.values()) for t in launches), len(launches)))
                (read, launches), (mass_read, mass_launches) = counts
                row = TrafficRow(gqa=r, length=n, packed_mb=packed / 1e6, read_mb=read / 1e6,
                                 ratio=read / packed, launches=launches,
                                 mass_ratio=mass_read / packed, mass_launches=mass_launches)
                rows.append(row)
                log(format_traffic_row(row))
    return rows


def decode_launches(*, lengths=(200, 1024), steps: int = 4, q_heads: int = 9, kv_heads: int = 3,
                    head_dim: int = 64) -> dict[str, float]:
    """Kernel launches per layer per decode step, on a small random llama of the given
    head shape, for a growing 4-bit cache and a 4-bit window evicting by snapkv, after
    prompts of each of ``lengths`` tokens (short: one pass; long: split in two)."""
    import importlib

    from .cache.config import CacheConfig
    from .cache.make import make_cache
    from .cache.route import route
    from .metalsim import Simulator

    llama = importlib.import_module("mlx_lm.models.llama")
    args = llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=q_heads * head_dim, num_hidden_layers=2,
        intermediate_size=256, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=1e-5, vocab_size=256, rope_theta=10000.0,
        max_position_embeddings=2 * max(lengths), tie_word_embeddings=True))
    model = llama.Model(args)
    route(model)
    sim = Simulator()
    out = {}
    with simulated(sim):
        for tokens in lengths:
            configs = {"4-bit": CacheConfig(key_bits=4, value_bits=4),
                       "4-bit window snapkv": CacheConfig(key_bits=4, value_bits=4,
                                                          window=tokens, policy="snapkv")}
            for name, config in configs.items():
                cache = make_cache(model, config)
                logits = model(mx.random.randint(0, 256, (1, tokens)), cache=cache)
                mx.eval(logits)
                before = sum(sim.launches.values())
                for _ in range(steps):
                    logits = model(mx.argmax(logits[:, -1:], axis=-1), cache=cache)
                    mx.eval(logits)
                launched = sum(sim.launches.values()) - before
                out[f"{name}, {tokens} tokens"] = launched / (steps * args.num_hidden_layers)
    return out
