"""``h2o`` (Heavy-Hitter Oracle, Zhang et al., 2023): keep the tokens with the largest
attention mass accumulated over every query so far; the residual keeps the recent ones."""

from .base import Policy


class H2OPolicy(Policy):
    name = "h2o"
    needs_attention = True

    def observe(self, score, mass):
        return score + mass
