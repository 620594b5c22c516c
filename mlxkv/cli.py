"""The ``mlxkv`` command: generate, chat, models, bench, eval."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .budget import format_bytes
from .errors import InputError, MlxkvError

CACHE_FLAGS = {
    # flag dest -> CacheConfig field
    "kv_key_bits": "key_bits",
    "kv_value_bits": "value_bits",
    "kv_group_size": "group_size",
    "kv_key_mode": "key_mode",
    "kv_residual": "residual",
    "kv_window": "window",
    "kv_sinks": "sinks",
    "kv_start": "start",
    "kv_budget": "budget",
    "kv_policy": "policy",
    "kv_allocator": "allocator",
}


OFF = ("off", "none")
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
    g = p.add_argument_group("KV cache")
    g.add_argument("--kv-bits", type=int, default=None, help="bits for keys and values (2, 3, 4, 8)")
    g.add_argument("--kv-key-bits", type=int, default=None, help="bits for keys (overrides --kv-bits)")
    g.add_argument("--kv-value-bits", type=int, default=None, help="bits for values (overrides --kv-bits)")
    g.add_argument("--kv-group-size", type=int, default=None, help="quantization group size (32, 64, 128)")
    g.add_argument("--kv-key-mode", choices=["token", "channel"], default=None,
                   help="group keys per token or per channel (KIVI)")
    g.add_argument("--kv-residual", type=int, default=None,
                   help="most recent tokens kept at full precision")
    g.add_argument("--kv-rotate", action="store_true", default=None,
                   help="randomized Hadamard rotation of keys before quantizing")
    g.add_argument("--kv-window", type=int, default=None, help="keep only sinks + this many recent tokens")
    g.add_argument("--kv-sinks", type=int, default=None, help="attention sinks kept with a window (default 4)")
    g.add_argument("--kv-start", type=int, default=None, help="tokens seen before quantizing starts")
    g.add_argument("--kv-budget", default=None, metavar="SIZE",
                   help="bytes the whole model's KV may take, e.g. 64MB or 48MiB ('off': none); "
                        "the cache keeps sinks + the most recent tokens that fit (quantized "
                        "with --kv-bits); `mlxkv chat` defaults to 64MB at 8 bits")
    g.add_argument("--kv-policy", default=None, metavar="NAME",
                   help="what a budget or window cache evicts: window (sinks + most recent, "
                        "the default), knorm, snapkv, h2o, tova")
    g.add_argument("--kv-allocator", default=None, metavar="NAME",
                   help="how a budget is split: uniform (default), pyramid (more for lower "
                        "layers) or adaptive (kv heads of a layer share slots by score)")
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


def cache_config_from_args(args, defaults: dict | None = None):
    from .cache.config import CacheConfig

    config = CacheConfig()
    changes = dict(defaults or {})
    flag = lambda name: getattr(args, name, None)  # noqa: E731  (commands without cache flags)
    if flag("kv_bits") is not None:
        changes["key_bits"] = changes["value_bits"] = args.kv_bits
    for dest, field in CACHE_FLAGS.items():
        value = flag(dest)
        if value is not None:
            changes[field] = None if field == "budget" and value.lower() in OFF else value
    if flag("kv_rotate"):
        changes["rotate"] = True
    if flag("max_kv_size") is not None:
        if args.kv_window is not None:
            raise InputError("give --kv-window or --max-kv-size, not both")
        sinks = changes.get("sinks", config.sinks)
        if args.max_kv_size <= sinks:
            raise InputError(f"--max-kv-size must be larger than the {sinks} sinks")
        changes["window"] = args.max_kv_size - sinks
    return config.replace(**changes)


def sampling_from_args(args):
    from .generation import Sampling

    return Sampling(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_for_args(args, quiet: bool = False, defaults: dict | None = None):
    """(model, tokenizer, resolved, cache config) for the command's flags (over
    ``defaults``, over the registry's defaults for the model)."""
    from .cache.route import model_head_dim
    from .models.loader import load_resolved
    from .models.registry import load_registry
    from .models.sources import resolve

    registry = load_registry()
    resolved = resolve(args.model, registry=registry, progress=not quiet)
    model_defaults = registry.entries[resolved.alias].cache if resolved.alias in registry.entries else {}
    config = cache_config_from_args(args, {**model_defaults, **(defaults or {})})
    model, tokenizer = load_resolved(resolved)
    return model, tokenizer, resolved, config.resolve(model_head_dim(model))


def cmd_generate(args) -> int:
    from .cache.config import make_cache
    from .generation import stream_generate

    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("no prompt: give --prompt TEXT or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise InputError("the prompt is empty")
    sampling = sampling_from_args(args)
    model, tokenizer, resolved, config = load_for_args(args, quiet=not args.verbose)
    if tokenizer.has_chat_template and not args.ignore_chat_template:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        tokens = prompt
    cache = make_cache(model, config)
    last = None
    for event in stream_generate(model, tokenizer, tokens, max_tokens=args.max_tokens,
                                 cache=cache, prefill_step=args.prefill_step,
                                 stop=args.stop, sampling=sampling):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        last = event
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        st = last.cache
        print(f"model: {resolved.alias or resolved.path} ({resolved.source})", file=sys.stderr)
        print(f"cache: {config.describe()}", file=sys.stderr)
        print(f"prompt: {last.prompt_tokens} tokens, {last.prefill_tps:.1f} tokens/s", file=sys.stderr)
        print(f"generation: {last.generated_tokens} tokens, {last.decode_tps:.1f} tokens/s "
              f"(finish: {last.finish_reason})", file=sys.stderr)
        budget = f" of a {format_bytes(st.budget)} budget" if st.budget else ""
        print(f"KV cache: {format_bytes(st.nbytes)}{budget} for {st.seen} tokens "
              f"({st.kept} kept, {st.compression:.2f}x vs {st.dtype})", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession

    sampling = sampling_from_args(args)
    tui = not args.plain and sys.stdin.isatty() and sys.stdout.isatty()
    if args.resume and not tui:
        raise InputError("--resume needs the full-screen app (a terminal, without --plain)")
    if tui:
        from mlxkv_app.store import ChatStore

        if args.resume:
            ChatStore().read(ChatStore.check_name(args.resume))  # fail before loading the model
    model, tokenizer, resolved, config = load_for_args(args, quiet=tui, defaults=chat_defaults(args))
    session = ChatSession(model, tokenizer, cache_config=config, system=args.system,
                          max_tokens=args.max_tokens, prefill_step=args.prefill_step,
                          stop=args.stop, sampling=sampling)
    if tui:
        from mlxkv_app import ChatApp

        ChatApp(session, model_name=resolved.alias or resolved.path.name,
                resume=args.resume).run()
        return 0
    print(f"mlxkv chat: {resolved.alias or resolved.path}, cache {config.describe()}. "
          "Type /clear to start over, /exit or Ctrl-D to quit.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            session.reset()
            continue
        if not line.strip():
            continue
        try:
            for event in session.send(line):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            st = event.cache
            print(f"\n[{event.decode_tps:.1f} tok/s, KV {format_bytes(st.nbytes)}, "
                  f"{st.seen} tokens]")
        except InputError as e:
            print(f"mlxkv: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[stopped]")


def cmd_models(args) -> int:
    from .models.registry import load_registry
    from .models.sources import resolve

    registry = load_registry()
    if args.action == "list":
        for alias, entry in registry.entries.items():
            mark = "*" if alias == registry.default else " "
            try:
                where = str(resolve(alias, registry=registry, network=False).path)
            except MlxkvError:
                where = "not on this machine"
            print(f"{mark} {alias:16} {entry.description}\n    {where}")
        return 0
    resolved = resolve(args.alias, registry=registry, network=args.action == "fetch",
                       progress=True)
    print(resolved.path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxkv", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a reply to one prompt, streamed to stdout")
    g.add_argument("prompt_arg", nargs="?", default=None, metavar="PROMPT")
    g.add_argument("--prompt", "-p", default=None, help="prompt text ('-' or none: read stdin)")
    g.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    g.add_argument("--verbose", "-v", action="store_true", help="print speed and cache figures")
    add_model_flags(g)
    add_sampling_flags(g)
    add_cache_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat with a model (full-screen app in a terminal)")
    c.add_argument("--plain", action="store_true",
                   help="a line-by-line chat instead of the full-screen app (also used when "
                        "stdin or stdout is not a terminal)")
    c.add_argument("--resume", default=None, metavar="NAME",
                   help="open a saved chat (see /chats in the app)")
    add_model_flags(c)
    add_sampling_flags(c)
    add_cache_flags(c)
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("models", help="list, fetch or locate models")
    m.add_argument("action", choices=["list", "fetch", "path"], nargs="?", default="list")
    m.add_argument("alias", nargs="?", default=None)
    m.set_defaults(func=cmd_models)

    from .bench import add_bench_parser
    from .evaluate import add_eval_parser
    add_bench_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "prompt_arg", None) is not None:
        if args.prompt is not None:
            parser.error("give the prompt once (as an argument or with --prompt)")
        args.prompt = args.prompt_arg
    try:
        return args.func(args)
    except MlxkvError as e:
        if args.debug:
            raise
        print(f"mlxkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
