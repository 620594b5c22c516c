"""Slash commands of the chat app: parsed here, carried out by the app."""

from __future__ import annotations

from dataclasses import dataclass

from mlxkv import CacheConfig, settings
from mlxkv.cache.codec import BITS
from mlxkv.errors import InputError

COMMANDS = {
    "budget": ("SIZE|off", "KV budget for the whole model, e.g. /budget 32MB"),
    "bits": ("N|off", f"bits for keys and values ({', '.join(map(str, BITS))}), or off for "
                      "full precision"),
    "window": ("N|off", "keep only the sinks + the N most recent tokens (no budget)"),
    "policy": ("NAME", "eviction policy under the budget"),
    "kv": ("SETTING VALUE", "any cache setting, as its --kv-* flag: /kv residual 128"),
    "clear": ("", "start a new conversation (ctrl+n)"),
    "save": ("NAME", "save the conversation and its compressed cache as NAME"),
    "load": ("NAME", "open the conversation saved as NAME"),
    "chats": ("", "list saved conversations"),
    "help": ("", "show keys and commands (F1)"),
}
CACHE_COMMANDS = ("budget", "bits", "window", "policy", "kv")


@dataclass(frozen=True)
class Command:
    name: str
    arg: str = ""


def parse(line: str) -> Command | None:
    """The command in ``line``, or None if it is a message (does not start with '/')."""
    text = line.strip()
    if not text.startswith("/"):
        return None
    name, _, arg = text[1:].partition(" ")
    name, arg = name.lower(), arg.strip()
    if name not in COMMANDS:
        raise InputError(f"unknown command /{name} (known: "
                         + ", ".join(f"/{c}" for c in COMMANDS) + ")")
    usage = COMMANDS[name][0]
    if name == "kv" and not arg:
        raise InputError("/kv SETTING VALUE sets one of: " + ", ".join(
            n.replace("_", "-") for n in (*settings.WORDS, *settings.FIELDS)))
    if usage and not arg:
        raise InputError(f"/{name} needs an argument: /{name} {usage}")
    if not usage and arg:
        raise InputError(f"/{name} takes no argument")
    return Command(name, arg)


def cache_change(config: CacheConfig, command: Command) -> CacheConfig:
    """The cache config after a cache command (checked against the model when applied):
    the command's name is the setting, read by ``mlxkv.settings`` like a CLI flag."""
    if command.name not in CACHE_COMMANDS:
        raise ValueError(f"/{command.name} is not a cache command")
    if command.name == "kv":
        name, _, value = command.arg.partition(" ")
        if not value.strip():
            raise InputError(f"/kv {name} needs a value: /kv {name} VALUE")
        return settings.apply(config, {name: value.strip()})
    return settings.apply(config, {command.name: command.arg})
