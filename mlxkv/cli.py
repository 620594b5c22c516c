"""The ``mlxkv`` command: parse, run the chosen command (``mlxkv.commands``; in a
terminal ``mlxkv chat`` runs the full-screen app), and report errors as one line."""

from __future__ import annotations

import sys
from typing import Sequence

from .commands import build_parser, chat
from .errors import MlxkvError


def run_chat(args) -> int:
    if chat.wants_app(args):
        from mlxkv_app.launch import run

        return run(args)
    return chat.run_plain(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command == "chat":
            args.func = run_chat
        if getattr(args, "prompt_arg", None) is not None:
            if args.prompt is not None:
                parser.error("give the prompt once (as an argument or with --prompt)")
            args.prompt = args.prompt_arg
        return args.func(args)
    except MlxkvError as e:
        if args is not None and args.debug:
            raise
        print(f"mlxkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
