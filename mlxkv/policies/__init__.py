"""Eviction policies: each only scores tokens (``base.Policy``); the scored cache keeps
the top ones. ``window`` (sinks + most recent) is the default."""

from .base import Policy
from .h2o import H2OPolicy
from .knorm import KnormPolicy
from .snapkv import SnapKVPolicy
from .tova import TOVAPolicy
from .window import WindowPolicy

POLICIES = {p.name: p for p in (WindowPolicy, KnormPolicy, SnapKVPolicy, H2OPolicy, TOVAPolicy)}


def known_policies() -> tuple[str, ...]:
    return tuple(POLICIES)


def make_policy(name: str) -> Policy:
    return POLICIES[name]()
