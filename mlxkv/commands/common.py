"""What the commands share: the model, cache and sampling flags, and loading a model
with the cache config its flags ask for."""

from __future__ import annotations

import argparse

from ..budget import format_bytes
from ..cache.codec import BITS
from ..cache.config import CacheConfig
from ..distributed import SINGLE
from ..policies import known_policies
from ..settings import SETTINGS

# --kv-* flag -> the word mlxkv.settings reads (a CacheConfig field, or bits/max_kv_size)
CACHE_FLAGS = ("kv_bits", *(f"kv_{name}" for name in SETTINGS), "max_kv_size")

# What `mlxkv chat` uses when no budget, window or bits are given: the conversation goes
# on forever inside a fixed amount of memory.
CHAT_DEFAULTS = {"budget": "64MB", "key_bits": 8, "value_bits": 8}


def chat_defaults(args) -> dict:
    defaults = {}
    if args.kv_budget is None and args.kv_window is None and args.max_kv_size is None:
        defaults["budget"] = CHAT_DEFAULTS["budget"]
    if args.kv_bits is None and args.kv_key_bits is None and args.kv_value_bits is None:
        defaults.update(key_bits=CHAT_DEFAULTS["key_bits"], value_bits=CHAT_DEFAULTS["value_bits"])
    return defaults


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model alias (see `mlxkv models`), local path or hub repo (default: the registry's default)")


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    """``--kv-<setting>`` for every cache setting, as its field declares it
    (``mlxkv.cache.spec``), and the two words that are not one field."""
    g = p.add_argument_group("KV cache")
    g.add_argument("--kv-bits", type=int, choices=BITS, default=None, help="bits for keys and values")
    for name, (spec, _) in SETTINGS.items():
        flag = "--kv-" + name.replace("_", "-")
        if spec.kind == "flag":
            g.add_argument(flag, action="store_true", default=None, help=spec.help)
            continue
        typed = {"count": int, "fraction": float}.get(spec.kind, str)
        metavar = spec.metavar or (None if spec.choices else
                                   {"count": "N", "fraction": "SHARE"}.get(spec.kind, "VALUE"))
        known = f" (known: {', '.join(known_policies())})" if spec.kind == "policy" else ""
        g.add_argument(flag, type=typed, choices=spec.choices, default=None, metavar=metavar,
                       help=spec.help + known)
    g.add_argument("--max-kv-size", type=int, default=None,
                   help="mlx-lm's name for a window: at most this many tokens, 4 of them sinks")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk")
    g.add_argument("--system", default=None, help="system message")


def cache_config_from_args(args, defaults: dict | None = None) -> CacheConfig:
    """The flags given (over ``defaults``), read by ``mlxkv.settings``."""
    from .. import settings

    words = {flag: getattr(args, flag) for flag in CACHE_FLAGS
             if getattr(args, flag, None) is not None}  # commands without cache flags: none
    return settings.apply(settings.apply(CacheConfig(), defaults or {}), words)


def sampling_from_args(args):
    from ..generation import Sampling

    return Sampling(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_for_args(args, quiet: bool = False, defaults: dict | None = None):
    """(model, tokenizer, resolved, cache config) for the command's flags (over
    ``defaults``, over the registry's defaults for the model), the config resolved for
    the model (e.g. its group size)."""
    from ..cache.shape import shape_of
    from ..models.loader import load_resolved
    from ..models.registry import load_registry
    from ..models.sources import resolve

    registry = load_registry()
    resolved = resolve(args.model, registry=registry, progress=not quiet)
    model_defaults = registry.entries[resolved.alias].cache if resolved.alias in registry.entries else {}
    config = cache_config_from_args(args, {**model_defaults, **(defaults or {})})
    model, tokenizer = load_resolved(resolved, group=getattr(args, "group", SINGLE))
    return model, tokenizer, resolved, config.resolve(shape_of(model).head_dim)


def describe_ranks(stats) -> str:
    """Each rank's part of a cache split over a group ("" in one process)."""
    if not stats.ranks:
        return ""
    parts = [f"rank {r.rank} {format_bytes(r.nbytes)}" + (f" of {format_bytes(r.budget)}" if r.budget else "")
             for r in stats.ranks]
    return f"over {len(stats.ranks)} processes: " + ", ".join(parts)
