"""User words -> ``CacheConfig``: the one translator behind the CLI's ``--kv-*`` flags, the
chat app's slash commands and settings screen, and ``[configs."name"]`` tables of eval
config files (and a server's per-request fields).

Words are ``CacheConfig`` field names, with or without a ``kv_`` prefix, plus ``bits``
(keys and values) and ``max_kv_size`` (mlx-lm's name: sinks + window); each field's
``spec.setting`` says how its value is read. Values may be typed or text: "off"/"none" turn bits, a window or a budget off; sizes take units
("64MB"). Changing one of budget/window drops the other; turning bits off drops what
only applies to quantized caches (per-channel keys, residual, middle, rotation).
"""

from __future__ import annotations

from typing import Any, Mapping

from .budget import parse_bytes
from .cache.config import CacheConfig
from .cache.spec import declared
from .errors import InputError

OFF = ("off", "none")
SETTINGS = declared(CacheConfig)  # name -> (spec.Setting, default)
WORDS = ("bits", "max_kv_size")   # words that are not one field: both bits, mlx-lm's window
FIELDS = tuple(SETTINGS)


def _off(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in OFF)


def _count(name: str, value: Any, nullable: bool) -> int | None:
    if _off(value):
        if nullable:
            return None
        raise InputError(f"{name} cannot be off (give a whole number)")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{name} must be a whole number (got {value!r})")
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name} must be a whole number or 'off' (got {value!r})") from None


def _fraction(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number from 0 to 1 (got {value!r})") from None


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "none"):
        return False
    raise InputError(f"{name} must be on or off (got {value!r})")


def _value(name: str, value: Any) -> Any:
    """``value`` read as the setting ``name`` declares (``CacheConfig``'s fields)."""
    if name == "max_kv_size":
        return _count(name, value, nullable=True)
    if name not in SETTINGS:
        raise InputError(f"unknown cache setting {name!r} (known: {', '.join(WORDS)}, "
                         f"{', '.join(FIELDS)})")
    spec = SETTINGS[name][0]
    if spec.kind == "count":
        return _count(name, value, spec.nullable)
    if spec.kind == "size":
        return None if _off(value) else parse_bytes(value)
    if spec.kind == "flag":
        return _flag(name, value)
    if spec.kind == "fraction":
        return _fraction(name, value)
    return str(value).strip().lower()  # text, policy


def apply(config: CacheConfig, words: Mapping[str, Any]) -> CacheConfig:
    """``config`` changed by ``words`` (name -> value); raises ``InputError`` naming the
    word that cannot be read. The result is not yet checked against a model."""
    changes: dict[str, Any] = {}
    for raw, value in words.items():
        name = raw.strip().lower().replace("-", "_")
        name = name[3:] if name.startswith("kv_") else name
        if name == "bits":
            changes["key_bits"] = changes["value_bits"] = _value("key_bits", value)
        else:
            changes[name] = _value(name, value)
    if "max_kv_size" in changes:
        size = changes.pop("max_kv_size")
        if "window" in changes and changes["window"] is not None:
            raise InputError("give a window or max_kv_size, not both")
        sinks = changes.get("sinks", config.sinks)
        if size is not None and size <= sinks:
            raise InputError(f"max_kv_size must be larger than the {sinks} sinks")
        changes["window"] = None if size is None else size - sinks
    if changes.get("budget") is not None and "window" not in changes:
        changes["window"] = None
    if changes.get("window") is not None and "budget" not in changes:
        changes["budget"] = None
    if changes.get("quant") == "codebook" and "key_mode" not in changes:
        changes["key_mode"] = "token"  # codebook keys are coded per token
    if "key_bits" in changes and changes["key_bits"] is None:  # what only quantized keys have
        changes.setdefault("key_mode", "token")
        changes.setdefault("rotate", False)
        changes.setdefault("outliers", 0)
    if ("key_bits" in changes or "value_bits" in changes) and all(
            changes.get(b, getattr(config, b)) is None for b in ("key_bits", "value_bits")):
        changes.setdefault("residual", 0)
        changes.setdefault("middle", 0)
    return config.replace(**changes)


def configs_from_toml(path: str) -> dict[str, CacheConfig]:
    """``[configs."name"]`` tables of cache settings (the words above) -> checked configs."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"cannot read the config file {path}: {e}") from None
    tables = doc.get("configs")
    if not isinstance(tables, dict) or not tables:
        raise InputError(f'{path} has no [configs."name"] tables')
    bad = [name for name, words in tables.items() if not isinstance(words, dict)]
    if bad:
        raise InputError(f'{path}: [configs."{bad[0]}"] must be a table of cache settings')
    return {name: apply(CacheConfig(), words).check() for name, words in tables.items()}
