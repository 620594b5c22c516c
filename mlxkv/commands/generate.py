"""``mlxkv generate``: one reply, streamed to stdout."""

from __future__ import annotations

import sys

from ..budget import format_bytes
from ..errors import InputError
from ..distributed import SINGLE
from .common import (add_cache_flags, add_model_flags, add_sampling_flags, describe_ranks,
                     load_for_args, sampling_from_args)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate a reply to one prompt, streamed to stdout")
    g.add_argument("prompt_arg", nargs="?", default=None, metavar="PROMPT")
    g.add_argument("--prompt", "-p", default=None, help="prompt text ('-' or none: read stdin)")
    g.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    g.add_argument("--verbose", "-v", action="store_true", help="print speed and cache figures")
    add_model_flags(g)
    add_sampling_flags(g)
    add_cache_flags(g)
    g.set_defaults(func=run)


def run(args) -> int:
    from ..cache.make import make_cache
    from ..cache.plan import plan
    from ..cache.shape import shape_of
    from ..generation import prompt_tokens, stream_generate

    group = getattr(args, "group", SINGLE)
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if group.size > 1:
            raise InputError("in a group (mlx.launch) give the prompt as an argument or with "
                             "--prompt: mlx.launch does not pass on the end of stdin, so a "
                             "piped prompt would never end")
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("no prompt: give --prompt TEXT or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise InputError("the prompt is empty")
    sampling = sampling_from_args(args)
    model, tokenizer, resolved, config = load_for_args(args, quiet=not args.verbose)
    tokens = prompt_tokens(tokenizer, prompt, chat_template=not args.ignore_chat_template,
                           system=args.system or None)
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
        print(f"cache: {plan(config, shape_of(model)).describe()}", file=sys.stderr)
        print(f"prompt: {last.prompt_tokens} tokens, {last.prefill_tps:.1f} tokens/s", file=sys.stderr)
        print(f"generation: {last.generated_tokens} tokens, {last.decode_tps:.1f} tokens/s "
              f"(finish: {last.finish_reason})", file=sys.stderr)
        budget = f" of a {format_bytes(st.budget)} budget" if st.budget else ""
        print(f"KV cache: {format_bytes(st.nbytes)}{budget} for {st.seen} tokens "
              f"({st.kept} kept, {st.compression:.2f}x vs {st.dtype})", file=sys.stderr)
        if st.ranks:
            print(f"  {describe_ranks(st)}", file=sys.stderr)
    return 0
