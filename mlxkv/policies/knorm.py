"""``knorm``: keys with a low L2 norm draw the most attention, so keep those (Devoto et
al., 2024). Needs no attention statistics."""

import mlx.core as mx

from .base import Policy


class KnormPolicy(Policy):
    name = "knorm"

    def enter(self, keys, positions):
        return -mx.linalg.norm(keys.astype(mx.float32), axis=-1)
