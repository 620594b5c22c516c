"""Eviction policies: each only scores tokens (``base.Policy``); the scored cache keeps
the top ones. ``window`` (sinks + most recent) is the default.

Every module of this package is imported here, and every ``Policy`` subclass with a
``name`` registers itself: a new policy is one new file.
"""

import importlib
import pkgutil

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


def make_policy(name: str) -> Policy:
    return POLICIES[name]()


__all__ = ["POLICIES", "H2OPolicy", "KnormPolicy", "Policy", "SnapKVPolicy", "TOVAPolicy",
           "WindowPolicy", "known_policies", "make_policy"]
