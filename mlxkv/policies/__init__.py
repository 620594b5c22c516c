"""Eviction policies: each only scores tokens (``base.Policy``); the scored cache keeps
the top ones. ``window`` (sinks + most recent) is the default.

Every module of this package is imported here, and every ``Policy`` subclass with a
``name`` registers itself: a new policy is one new file. Its constructor's keywords are
its parameters, set as ``name:key=value,...`` (e.g. ``snapkv:window=32,kernel=7``).
"""

import importlib
import inspect
import pkgutil

from ..errors import InputError

from .base import REGISTRY, Policy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .h2o import H2OPolicy  # noqa: E402
from .knorm import KnormPolicy  # noqa: E402
from .snapkv import SnapKVPolicy  # noqa: E402
from .tova import TOVAPolicy  # noqa: E402
from .window import WindowPolicy  # noqa: E402

# the default first, then by name
POLICIES = {name: REGISTRY[name] for name in sorted(REGISTRY, key=lambda n: (n != "window", n))}


def known_policies() -> tuple[str, ...]:
    return tuple(POLICIES)


def policy_params(name: str) -> dict:
    """A policy's parameters and their defaults (its constructor's keywords)."""
    return {p.name: p.default for p in inspect.signature(POLICIES[name]).parameters.values()
            if p.default is not inspect.Parameter.empty}


def parse_policy(text: str) -> tuple[str, dict]:
    """``"snapkv"`` or ``"snapkv:window=32,kernel=7"`` -> (name, parameters); raises
    ``InputError`` naming an unknown policy or parameter, or a value that is not a number."""
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in POLICIES:
        raise InputError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
    known, params = policy_params(name), {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in known:
            have = ", ".join(f"{k}={v}" for k, v in known.items()) or "none"
            raise InputError(f"policy {name!r} has no parameter {key!r} (its parameters: {have})")
        try:
            params[key] = type(known[key])(value) if eq else None
        except (TypeError, ValueError):
            params[key] = None
        if params[key] is None:
            raise InputError(f"policy {name!r}: {key} takes a number, as in {name}:{key}="
                             f"{known[key]} (got {item!r})")
    return name, params


def make_policy(text: str) -> Policy:
    """The policy ``text`` names, with its parameters (``parse_policy``; a policy checks
    their values itself, an ``InputError``)."""
    name, params = parse_policy(text)
    return POLICIES[name](**params)


__all__ = ["POLICIES", "H2OPolicy", "KnormPolicy", "Policy", "SnapKVPolicy", "TOVAPolicy",
           "WindowPolicy", "known_policies", "make_policy", "parse_policy", "policy_params"]
