"""The ``mlxkv`` command: parse, run the chosen command (``mlxkv.commands``; in a
terminal ``mlxkv chat`` runs the full-screen app), and report errors as one line."""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from . import distributed
from .commands import build_parser, chat
from .distributed import SINGLE
from .errors import MlxkvError


FOLLOWER_GRACE = 5.0  # seconds another rank waits before it ends on an error


def run_chat(args) -> int:
    if chat.wants_app(args) and args.group.size == 1:  # a group chats line by line on rank 0
        from mlxkv_app.launch import run

        return run(args)
    return chat.run_plain(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = None
    group = SINGLE
    try:
        group = distributed.init()
        args = parser.parse_args(argv)
        if args.command == "chat":
            args.func = run_chat
        if getattr(args, "prompt_arg", None) is not None:
            if args.prompt is not None:
                parser.error("give the prompt once (as an argument or with --prompt)")
            args.prompt = args.prompt_arg
        args.group = group
        if not group.leader:  # under mlx.launch only rank 0 prints; the others follow
            sys.stdout = open(os.devnull, "w")
            if not args.debug:
                sys.stderr = sys.stdout
        return args.func(args)
    except MlxkvError as e:
        if args is not None and args.debug:
            raise
        if group.leader:  # every rank finds the same error: rank 0 says it
            print(f"mlxkv: error: {e}", file=sys.stderr)
        else:  # mlx.launch stops every rank when one ends: let rank 0 say it first
            time.sleep(FOLLOWER_GRACE)
        return 2
    except RuntimeError as e:
        if group.size == 1 or args.debug:
            raise
        # in a group, MLX raises RuntimeError when a collective fails (a rank was lost)
        print(f"mlxkv: error: rank {group.rank} of {group.size}: the group failed ({e})",
              file=sys.__stderr__)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
