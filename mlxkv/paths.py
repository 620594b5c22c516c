"""Where mlxkv keeps its files: the user cache dir (models) and data dir (chats)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _platform_dir(kind: str) -> Path:
    home = Path.home()
    if sys.platform == "darwin":
        base = home / "Library" / ("Caches" if kind == "cache" else "Application Support")
    else:
        var, default = {
            "cache": ("XDG_CACHE_HOME", home / ".cache"),
            "data": ("XDG_DATA_HOME", home / ".local" / "share"),
        }[kind]
        base = Path(os.environ.get(var) or default)
    return base / "mlxkv"


def cache_dir() -> Path:
    """Downloaded models and other re-creatable files (``MLXKV_CACHE_DIR`` overrides)."""
    return Path(os.environ.get("MLXKV_CACHE_DIR") or _platform_dir("cache"))


def data_dir() -> Path:
    """Conversations and saved caches (``MLXKV_DATA_DIR`` overrides)."""
    return Path(os.environ.get("MLXKV_DATA_DIR") or _platform_dir("data"))
