"""``mlxkv bench``: decode speed and KV memory against mlx-lm's caches; ``--kernels``:
the fused Metal kernel against MLX's own attention."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict

import mlx.core as mx

from ..bench import HEADER, markdown_table, run_bench
from ..cache.codec import BITS
from ..errors import InputError
from .common import add_model_flags, load_for_args


def run_kernels(args) -> int:
    from ..cache.codec import default_group
    from ..kernel_bench import (KERNEL_HEADER, KERNEL_TOLERANCE, NEEDS_METAL, TRAFFIC_HEADER,
                               decode_launches, run_kernel_bench, run_traffic_bench, simulated,
                               supported_on_this_machine)

    lengths = args.kernel_lengths
    try:
        heads = [int(x) for x in args.kernel_heads.split(":")]
    except ValueError:
        raise InputError("--kernel-heads takes query:kv heads like 9:3") from None
    if any(n < 1 for n in lengths) or len(heads) != 2 or min(heads) < 1:
        raise InputError("--kernel-lengths takes token counts >= 1 and --kernel-heads two "
                         "positive counts (query:kv)")
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
    traffic, launches = [], {}
    if args.simulate:  # what only the simulator can count: device bytes and launches
        print(f"\ndevice bytes one decode step's attention reads (per kv head, "
              f"{args.kernel_bits}-bit K/V, head dim {args.kernel_head_dim}):")
        print(TRAFFIC_HEADER)
        traffic = run_traffic_bench(lengths=lengths, bits=args.kernel_bits,
                                    head_dim=args.kernel_head_dim,
                                    group_size=default_group(args.kernel_head_dim))
        launches = decode_launches(q_heads=heads[0], kv_heads=heads[1],
                                   head_dim=args.kernel_head_dim)
        print("\nkernel launches per layer per decode step: "
              + ", ".join(f"{k}: {v:g}" for k, v in launches.items()))
    if args.json:
        with open(args.json, "w") as f:
            doc = [asdict(r) for r in rows]
            if args.simulate:
                doc = {"kernels": doc, "traffic": [asdict(r) for r in traffic],
                       "launches_per_layer_step": launches}
            json.dump(doc, f, indent=1)
    bad = [r.length for r in rows if not r.max_error <= KERNEL_TOLERANCE]
    if bad:
        print(f"mlxkv: error: the fused kernel disagrees with its reference at {bad} tokens "
              f"(max error above {KERNEL_TOLERANCE})", file=sys.stderr)
        return 1
    return 0


def run_serve(args) -> int:
    from ..server.bench import restore_bench

    model, tokenizer, resolved, config = load_for_args(
        args, defaults={"bits": args.serve_bits, "budget": args.serve_budget})
    print(f"mlxkv bench --serve: {resolved.alias or resolved.path.name}, a {args.serve_tokens}-token "
          f"conversation, cache {config.describe()}", flush=True)
    row = restore_bench(model, tokenizer, name=resolved.alias or resolved.path.name, config=config,
                        tokens=args.serve_tokens, repeats=args.serve_repeats)
    lines = ["| conversation | cache | --kv-total | TTFT restored from disk | TTFT prefilled again | speedup |",
             "|---|---|---|---|---|---|",
             f"| {row['tokens']} tokens | {row['cache']} | {row['kv_total']} | "
             f"{row['ttft_restored_s']:.3f} s | {row['ttft_prefilled_s']:.3f} s | {row['speedup']}x |"]
    print("\n".join(lines))
    print(f"(medians of {row['repeats']} follow-up turns; restored {row['restored_s']}, prefilled "
          f"{row['prefilled_s']}; tokens served from the restored cache {row['cached_tokens']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def run(args) -> int:
    if args.kernels:
        return run_kernels(args)
    if args.serve:
        return run_serve(args)
    contexts = args.contexts
    if any(c < 2 for c in contexts):
        raise InputError("--contexts must be token counts >= 2, e.g. --contexts 1024 4096")
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


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="decode speed and KV memory against mlx-lm's caches",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(b)
    b.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], metavar="N",
                   help="context lengths in tokens")
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
    k.add_argument("--kernel-lengths", type=int, nargs="+", metavar="N",
                   default=[1024, 2048, 4096, 8192, 16384, 32768], help="cache lengths in tokens")
    k.add_argument("--kernel-bits", type=int, choices=BITS, default=4, help="bits of the quantized K and V")
    k.add_argument("--kernel-heads", default="9:3", help="query:kv heads (default model's)")
    k.add_argument("--kernel-head-dim", type=int, default=64)
    k.add_argument("--kernel-repeats", type=int, default=20, help="timed calls per length")
    k.add_argument("--simulate", action="store_true",
                   help="run the kernels on the CPU simulator of Metal (checks outputs; "
                        "timings mean nothing)")
    v = b.add_argument_group("server (--serve)")
    v.add_argument("--serve", action="store_true",
                   help="time to first token of a follow-up turn on a long conversation that "
                        "`mlxkv serve` saved to disk, against prefilling it again")
    v.add_argument("--serve-tokens", type=int, default=4096, help="tokens of the conversation")
    v.add_argument("--serve-repeats", type=int, default=3, help="follow-up turns timed")
    v.add_argument("--serve-bits", type=int, choices=BITS, default=8, help="bits of K and V")
    v.add_argument("--serve-budget", default="64MB", help="the conversation's KV budget ('off': none)")
    b.set_defaults(func=run)
