"""Eviction policies: each scores tokens; the budgeted cache keeps the top ones.

``window`` (StreamingLLM: the sinks and the most recent tokens) is built into the
budgeted cache and is the default.
"""

POLICIES = ("window",)


def known_policies() -> tuple[str, ...]:
    return POLICIES
