"""``mlxkv chat``: the flags and the line-by-line chat (when stdin or stdout is not a
terminal, or with ``--plain``); in a terminal ``mlxkv.cli`` runs the full-screen app."""

from __future__ import annotations

import sys

from ..budget import format_bytes
from ..cache.plan import plan
from ..cache.shape import shape_of
from ..errors import InputError
from ..distributed import SINGLE
from .common import (add_cache_flags, add_model_flags, add_sampling_flags, chat_defaults,
                     describe_ranks, load_for_args, sampling_from_args)


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="chat with a model (full-screen app in a terminal)")
    c.add_argument("--plain", action="store_true",
                   help="a line-by-line chat instead of the full-screen app (also used when "
                        "stdin or stdout is not a terminal)")
    c.add_argument("--resume", default=None, metavar="NAME",
                   help="open a saved chat (see /chats in the app)")
    add_model_flags(c)
    add_sampling_flags(c)
    add_cache_flags(c)


def wants_app(args) -> bool:
    return not args.plain and sys.stdin.isatty() and sys.stdout.isatty()


def session_for_args(args, quiet: bool):
    """(session, resolved model) for the chat flags."""
    from ..chat import ChatSession

    sampling = sampling_from_args(args)
    model, tokenizer, resolved, config = load_for_args(args, quiet=quiet, defaults=chat_defaults(args))
    session = ChatSession(model, tokenizer, cache_config=config, system=args.system,
                          max_tokens=args.max_tokens, prefill_step=args.prefill_step,
                          stop=args.stop, sampling=sampling)
    return session, resolved


def run_plain(args) -> int:
    if args.resume:
        raise InputError("--resume needs the full-screen app (a terminal, without --plain)")
    group = getattr(args, "group", SINGLE)
    session, resolved = session_for_args(args, quiet=False)
    print(f"mlxkv chat: {resolved.alias or resolved.path}, cache {plan(session.cache_config, shape_of(session.model)).describe()}. "
          "Type /clear to start over, /exit or Ctrl-D to quit.", flush=True)
    while True:
        line = None
        if group.leader:
            try:
                line = input("> ")
            except EOFError:
                print()
        line = group.broadcast(line)  # in a group, rank 0 reads for all; None: end of input
        if line is None:
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
            ranks = f"; {describe_ranks(st)}" if st.ranks else ""
            print(f"\n[{event.decode_tps:.1f} tok/s, KV {format_bytes(st.nbytes)}, "
                  f"{st.seen} tokens{ranks}]", flush=True)
        except InputError as e:
            print(f"mlxkv: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[stopped]")
