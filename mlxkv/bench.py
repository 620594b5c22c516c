"""``mlxkv bench``: decode speed, KV bytes and peak memory of mlxkv caches against
mlx-lm's own caches, same model, same process, ratios against mlx-lm's ``KVCache``."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import mlx.core as mx

from .errors import InputError

BASELINE = "mlx-lm KVCache"


@dataclass
class BenchRow:
    config: str
    context: int
    prefill_tps: float
    decode_tps_median: float
    decode_tps_best: float
    kv_bytes: int
    peak_memory: int
    bytes_per_token: int
    bandwidth_fraction: float
    ratio: float = 1.0  # decode tokens/s over the baseline's at the same context


def cache_factories(model, window: int = 512) -> dict[str, Callable[[], list]]:
    """The named cache configs that bench and eval compare: mlx-lm's caches and mlxkv's."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    from .cache.route import model_head_dim
    from .cache.codec import default_group
    from .cache.config import CacheConfig, make_cache

    n = len(model.layers)
    group = default_group(model_head_dim(model))  # mlxkv's configs choose the same by themselves
    return {
        BASELINE: lambda: [KVCache() for _ in range(n)],
        "mlx-lm Quantized 8-bit": lambda: [QuantizedKVCache(group_size=group, bits=8) for _ in range(n)],
        "mlx-lm Quantized 4-bit": lambda: [QuantizedKVCache(group_size=group, bits=4) for _ in range(n)],
        f"mlx-lm Rotating {window}": lambda: [RotatingKVCache(max_size=window, keep=4) for _ in range(n)],
        "mlxkv full": lambda: make_cache(model, CacheConfig()),
        "mlxkv 8-bit": lambda: make_cache(model, CacheConfig(key_bits=8, value_bits=8)),
        "mlxkv 4-bit": lambda: make_cache(model, CacheConfig(key_bits=4, value_bits=4)),
        "mlxkv 4-bit rotated": lambda: make_cache(model, CacheConfig(
            key_bits=4, value_bits=4, rotate=True)),
        "mlxkv 4-bit channel-K r128": lambda: make_cache(model, CacheConfig(
            key_bits=4, value_bits=4, key_mode="channel", residual=128)),
        "mlxkv 2-bit channel-K r128": lambda: make_cache(model, CacheConfig(
            key_bits=2, value_bits=2, key_mode="channel", residual=128)),
        f"mlxkv window {window}": lambda: make_cache(model, CacheConfig(window=window - 4, sinks=4)),
        f"mlxkv 4-bit window {window}": lambda: make_cache(model, CacheConfig(
            window=window - 4, sinks=4, key_bits=4, value_bits=4)),
        "mlxkv budget 16MB 4-bit": lambda: make_cache(model, CacheConfig(
            budget="16MB", key_bits=4, value_bits=4, key_mode="channel",
            residual=64)),
        **{f"mlxkv budget 16MB 4-bit {policy}": lambda policy=policy: make_cache(model, CacheConfig(
            budget="16MB", key_bits=4, value_bits=4, residual=64, policy=policy))
           for policy in ("knorm", "snapkv", "h2o", "tova")},
        "mlxkv budget 16MB 4-bit snapkv adaptive": lambda: make_cache(model, CacheConfig(
            budget="16MB", key_bits=4, value_bits=4, residual=64,
            policy="snapkv", allocator="adaptive")),
    }


def measure_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the best of a few reductions over an array far
    larger than the caches. On a GPU through MLX; on the CPU through NumPy, whose
    vectorized reduction reaches the memory limit where MLX's CPU kernels do not."""
    if mx.default_device() == mx.gpu:
        a = mx.ones((nbytes // 4,), mx.float32)
        mx.eval(a)
        reduce = lambda: mx.eval(a.sum())  # noqa: E731
    else:
        import numpy as np

        a = np.ones(nbytes // 4, np.float32)
        reduce = a.sum
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        reduce()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def _weights_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _prefill(model, cache, tokens: mx.array, step: int) -> float:
    from .generation import prefill

    t = time.perf_counter()
    prefill(model, tokens, cache, prefill_step=step)
    return tokens.shape[0] / (time.perf_counter() - t)


def bench_config(model, make, context: int, decode: int, prefill_step: int,
                 bandwidth: float, weights: int, seed: int = 0) -> BenchRow | None:
    tokens = mx.random.randint(0, model.args.vocab_size, (context,), key=mx.random.key(seed))
    mx.clear_cache()
    mx.reset_peak_memory()
    cache = make()
    prefill_tps = _prefill(model, cache, tokens, prefill_step)
    y = mx.array([[int(tokens[-1])]])
    times = []
    for i in range(decode + 2):
        t = time.perf_counter()
        logits = model(y, cache=cache)
        y = mx.argmax(logits[:, -1:, :], axis=-1)
        mx.eval(y)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
    kv = sum(c.nbytes for c in cache)
    per_token = weights + kv
    med = 1 / statistics.median(times)
    return BenchRow(config="", context=context, prefill_tps=prefill_tps, decode_tps_median=med,
                    decode_tps_best=1 / min(times), kv_bytes=kv, peak_memory=mx.get_peak_memory(),
                    bytes_per_token=per_token, bandwidth_fraction=per_token * med / bandwidth)


def run_bench(model, *, contexts, configs=None, decode: int = 16, prefill_step: int = 512,
              window: int = 512, log=print) -> list[BenchRow]:
    factories = cache_factories(model, window)
    names = configs or list(factories)
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise InputError(f"unknown bench config(s) {unknown}; known: {list(factories)}")
    if BASELINE not in names:
        names = [BASELINE] + names
    bandwidth = measure_bandwidth()
    weights = _weights_bytes(model)
    log(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weights / 1e6:.1f} MB")
    rows = []
    for context in contexts:
        base = None
        for name in names:
            row = bench_config(model, factories[name], context, decode, prefill_step,
                               bandwidth, weights)
            row.config = name
            if name == BASELINE:
                base = row.decode_tps_median
            row.ratio = row.decode_tps_median / base
            rows.append(row)
            log(format_row(row))
    return rows


HEADER = (f"{'config':30} {'ctx':>6} {'prefill t/s':>11} {'decode t/s':>10} {'best':>7} "
          f"{'x base':>7} {'KV MB':>8} {'peak MB':>8} {'BW %':>5}")


def format_row(r: BenchRow) -> str:
    return (f"{r.config:30} {r.context:6d} {r.prefill_tps:11.1f} {r.decode_tps_median:10.2f} "
            f"{r.decode_tps_best:7.2f} {r.ratio:7.2f} {r.kv_bytes / 1e6:8.2f} "
            f"{r.peak_memory / 1e6:8.1f} {100 * r.bandwidth_fraction:5.1f}")


def markdown_table(rows: list[BenchRow]) -> str:
    lines = ["| config | context | prefill tok/s | decode tok/s (median) | vs mlx-lm KVCache | KV MB | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.config} | {r.context} | {r.prefill_tps:.1f} | {r.decode_tps_median:.2f} | "
                     f"{r.ratio:.2f}x | {r.kv_bytes / 1e6:.2f} | {r.peak_memory / 1e6:.1f} |")
    return "\n".join(lines)


def cmd_kernel_bench(args) -> int:
    from .cache.codec import default_group
    from .kernel_bench import (KERNEL_HEADER, KERNEL_TOLERANCE, NEEDS_METAL, run_kernel_bench, simulated,
                               supported_on_this_machine)

    try:
        lengths = [int(x) for x in args.kernel_lengths.split(",")]
        heads = [int(x) for x in args.kernel_heads.split(":")]
    except ValueError:
        raise InputError("--kernel-lengths takes token counts like 1024,8192 and "
                         "--kernel-heads query:kv heads like 9:3") from None
    if any(n < 1 for n in lengths) or len(heads) != 2 or min(heads) < 1:
        raise InputError("--kernel-lengths takes token counts >= 1 and --kernel-heads two "
                         "positive counts (query:kv)")
    if args.kernel_bits not in (2, 3, 4, 8):
        raise InputError(f"--kernel-bits must be 2, 3, 4 or 8 (got {args.kernel_bits})")
    if default_group(args.kernel_head_dim) is None:
        raise InputError(f"--kernel-head-dim must be a multiple of 32 (got {args.kernel_head_dim})")
    if not (args.simulate or supported_on_this_machine()):
        raise InputError(NEEDS_METAL)
    context = simulated() if args.simulate else contextlib.nullcontext()
    where = "the CPU simulator of Metal (timings mean nothing)" if args.simulate else mx.default_device()
    print(f"mlxkv bench --kernels: {args.kernel_bits}-bit K/V, heads {heads[0]}:{heads[1]}, "
          f"head dim {args.kernel_head_dim}, on {where}", file=sys.stderr)
    with context:
        print(KERNEL_HEADER)
        rows = run_kernel_bench(lengths=lengths, bits=args.kernel_bits, q_heads=heads[0],
                                kv_heads=heads[1], head_dim=args.kernel_head_dim,
                                group_size=default_group(args.kernel_head_dim),
                                repeats=args.kernel_repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    bad = [r.length for r in rows if not r.max_error <= KERNEL_TOLERANCE]
    if bad:
        print(f"mlxkv: error: the fused kernel disagrees with its reference at {bad} tokens "
              f"(max error above {KERNEL_TOLERANCE})", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from .cli import load_for_args

    if args.kernels:
        return cmd_kernel_bench(args)
    contexts = [int(x) for x in args.contexts.split(",")]
    if any(c < 2 for c in contexts):
        raise InputError("--contexts must be token counts >= 2, e.g. 1024,4096")
    model, _tok, resolved, _config = load_for_args(args)
    print(f"mlxkv bench: {resolved.alias or resolved.path} on {mx.default_device()}", file=sys.stderr)
    print(HEADER)
    rows = run_bench(model, contexts=contexts, configs=args.config or None, decode=args.decode,
                     prefill_step=args.prefill_step, window=args.window)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(rows) + "\n")
    return 0


def add_bench_parser(sub) -> None:
    from .cli import add_model_flags

    b = sub.add_parser("bench", help="decode speed and KV memory against mlx-lm's caches",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(b)
    b.add_argument("--contexts", default="1024,4096", help="context lengths (comma separated)")
    b.add_argument("--decode", type=int, default=16, help="decode steps timed per config")
    b.add_argument("--prefill-step", type=int, default=512)
    b.add_argument("--window", type=int, default=512, help="window size of the window configs")
    b.add_argument("--config", action="append", help="run only this config (repeatable)")
    b.add_argument("--json", help="write the rows as JSON here")
    b.add_argument("--markdown", help="write a Markdown table here")
    k = b.add_argument_group("fused kernels (--kernels, needs Metal)")
    k.add_argument("--kernels", action="store_true",
                   help="time mlxkv's fused quantized-cache attention against "
                        "mx.fast.scaled_dot_product_attention on fp16 K/V (no model loaded)")
    k.add_argument("--kernel-lengths", default="1024,2048,4096,8192,16384,32768",
                   help="cache lengths in tokens")
    k.add_argument("--kernel-bits", type=int, default=4, help="bits of the quantized K and V")
    k.add_argument("--kernel-heads", default="9:3", help="query:kv heads (default model's)")
    k.add_argument("--kernel-head-dim", type=int, default=64)
    k.add_argument("--kernel-repeats", type=int, default=20, help="timed calls per length")
    k.add_argument("--simulate", action="store_true",
                   help="run the kernels on the CPU simulator of Metal (checks outputs; "
                        "timings mean nothing)")
    b.set_defaults(func=cmd_bench)
