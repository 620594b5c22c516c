"""What a cache setting is, declared once on its ``CacheConfig`` field.

``setting(default, kind=..., help=...)`` is a dataclass field whose metadata says how the
setting is read from words (``mlxkv.settings``: CLI flags, the chat app's ``/kv`` command
and settings screen, the server's ``kv_*`` body fields, ``models.toml`` and eval config
files) and how it is shown (its ``--kv-*`` flag, ``describe``). A new option is one field:
every one of those reaches it, and saved caches record it (``CacheConfig.to_dict``).

Kinds: ``count`` (a whole number), ``size`` (bytes, "64MB"), ``flag`` (on/off),
``text`` (one of ``choices``), ``fraction`` (a number in [0, 1]), ``policy`` (a policy
name with its parameters, ``snapkv:window=32``). ``nullable``: "off"/"none" unset it.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, Sequence

KINDS = ("count", "size", "flag", "text", "fraction", "policy")


@dataclass(frozen=True)
class Setting:
    kind: str
    help: str
    choices: Sequence | None = None
    nullable: bool = False
    metavar: str | None = None
    describe: Callable[[Any], str] | None = None  # words for ``describe`` when not the default


def setting(default, *, kind: str, help: str, **more) -> Field:
    if kind not in KINDS:
        raise ValueError(f"unknown setting kind {kind!r}")
    return field(default=default, metadata={"setting": Setting(kind, help, **more)})


def declared(cls) -> dict[str, tuple[Setting, Any]]:
    """The settings of a dataclass of ``setting`` fields: name -> (setting, default)."""
    return {f.name: (f.metadata["setting"], f.default) for f in fields(cls)
            if "setting" in f.metadata}
