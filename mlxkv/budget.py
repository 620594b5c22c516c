"""Byte budgets: parsing ("64MB", "1.5GiB") and sizing a cache to fit one."""

from __future__ import annotations

import re

from .errors import InputError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int) -> int:
    """'64MB' -> 64_000_000, '64MiB' -> 67_108_864, 1000 -> 1000."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise InputError(f"cannot read {text!r} as a size: use a number with B, KB, MB, GB, "
                             "KiB, MiB or GiB, e.g. 64MB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise InputError(f"a budget must be more than 0 bytes (got {text!r})")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def token_bytes(codec, head_dim: int, kv_heads: int, dtype_size: int) -> float:
    """Bytes one token takes per layer in a codec's storage (one of K or V)."""
    return kv_heads * codec.bytes_per_token(head_dim, dtype_size)
