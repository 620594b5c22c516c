"""What an eviction policy is: a small class that only scores tokens.

Scores have shape (B, H_kv, n): higher = keep. The scored cache (``mlxkv.cache.scored``)
does the rest: when its ring is full it keeps, per kv head, the top-scoring tokens, and
the sinks and the full-precision residual of recent tokens are always kept.

A policy gives a token its score when it enters the ring (``enter``), and, if it
``needs_attention``, updates scores from the attention probabilities of the queries it
observes (``observe``), which the cache hands over from its own attention computation
(no second pass over the cache, no L x L matrix).
"""

from __future__ import annotations

import mlx.core as mx


REGISTRY: dict[str, type["Policy"]] = {}


class Policy:
    name = ""  # a subclass with a name is registered under it (``mlxkv.policies.POLICIES``)
    needs_attention = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def enter(self, keys: mx.array, positions: mx.array) -> mx.array:
        """Score of tokens entering the ring: keys (B, H, n, D), positions (n,)."""
        B, H, n, _ = keys.shape
        return mx.zeros((B, H, n), mx.float32)

    def observed_queries(self, first: int, n: int, total: int) -> tuple[int, int] | None:
        """Which of the queries ``first .. first + n`` (of a chunk of ``total``) to observe,
        as a (start, stop) range within them, or None for none."""
        return (0, n)

    def observe(self, score: mx.array, mass: mx.array) -> mx.array:
        """New scores from ``mass`` (B, H, n): attention the observed queries gave each
        token, summed over queries and the query heads sharing a kv head."""
        return score
