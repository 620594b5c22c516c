"""Decode speed, KV bytes and peak memory of cache configs (``mlxkv.presets``) against
mlx-lm's own caches, same model, same process, ratios against mlx-lm's ``KVCache``."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import mlx.core as mx

from .errors import InputError
from .presets import BASELINE, cache_factories


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
