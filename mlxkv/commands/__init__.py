"""The ``mlxkv`` command's subcommands, one module each (``add_parser(sub)`` and ``run``),
over the library: generation/chat, bench and evaluation, never the other way round.
``mlxkv.cli`` builds the parser and runs the chosen command."""

from __future__ import annotations

import argparse

from ..errors import InputError

from . import bench, chat, eval, generate, models, serve


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ``InputError``s: ``mlxkv.cli`` shows them as one
    line (``mlxkv: error: ...``, status 2), like every other error."""

    def error(self, message):
        raise InputError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mlxkv", description="An MLX-native LLM runtime whose heart is the KV cache.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (generate, chat, serve, models, bench, eval):
        command.add_parser(sub)
    return parser


__all__ = ["build_parser", "bench", "chat", "eval", "generate", "models", "serve"]
