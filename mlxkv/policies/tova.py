"""``tova`` (Token Omission Via Attention, Oren et al., 2024): keep the tokens the current
(last) query attends to most; scores are replaced at every step."""

from .base import Policy


class TOVAPolicy(Policy):
    name = "tova"
    needs_attention = True

    def observed_queries(self, first, n, total):
        return (n - 1, n) if first + n == total else None

    def observe(self, score, mass):
        return mass
