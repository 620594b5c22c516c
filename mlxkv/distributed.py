"""Tensor-parallel groups: several processes (one per Mac, or several on one machine) run
one model together over ``mx.distributed``, started by ``mlx.launch``.

Every rank holds its share of the weights (mlx-lm's ``model.shard``) and the caches of its
own kv heads, and runs the same decode loop in lockstep: the model's own collectives
(``all_sum`` after the attention and MLP projections) keep the ranks together. What only
one rank knows (rank 0: the user's input, a stop key, an HTTP request) reaches the others
through ``Group.broadcast``; statistics come back through ``Group.gather``.

A process not started by ``mlx.launch`` is a group of one, and none of this costs anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from .errors import GroupError

# Collectives of one group must reach the transport in the same order on every rank. The
# decode loop (mlx-lm's generate_step) evaluates the next step's graph, with the model's
# own all_sums, while a token is handled. Those take no stream: MLX puts a collective on
# the default stream of the CPU device as it is inside ``mx.stream(generation_stream)``
# (the generation stream itself on the CPU backend, the CPU's default stream beside a GPU
# one on a Mac). Ours are made in that same context, so they queue behind the model's.
# (On another stream the two would run at once and mix their messages.)

LAUNCH_ENV = "MLX_RANK"  # set by mlx.launch for each process it starts


@dataclass(frozen=True)
class Group:
    """An ``mx.distributed`` group (None: a single process)."""

    group: object = None

    @property
    def size(self) -> int:
        return 1 if self.group is None else self.group.size()

    @property
    def rank(self) -> int:
        return 0 if self.group is None else self.group.rank()

    @property
    def leader(self) -> bool:
        """Rank 0: the process that prints, reads input and serves HTTP."""
        return self.rank == 0

    def _sum(self, a: mx.array) -> mx.array:
        with mx.stream(generation_stream):
            out = mx.distributed.all_sum(a, group=self.group)
            mx.eval(out)
        return out

    def broadcast(self, obj=None):
        """Rank 0's ``obj`` (JSON-able) on every rank; the others pass nothing. A
        collective: every rank calls it at the same point."""
        if self.size == 1:
            return obj
        data = json.dumps(obj).encode() if self.leader else b""
        n = int(self._sum(mx.array([len(data)], dtype=mx.int32)).item())
        buf = (mx.array(np.frombuffer(data, dtype=np.uint8)) if self.leader
               else mx.zeros((n,), dtype=mx.uint8))
        return json.loads(bytes(np.array(self._sum(buf))))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a collective)."""
        if self.size == 1:
            return flag
        return int(self._sum(mx.array([int(bool(flag))], dtype=mx.int32)).item()) > 0

    def gather(self, values) -> np.ndarray:
        """Every rank's ``values`` (a flat list of whole numbers, the same length on every
        rank), as an array (ranks, len) (a collective)."""
        a = mx.array(np.asarray(values, dtype=np.int64).reshape(1, -1))
        if self.size == 1:
            return np.array(a)
        with mx.stream(generation_stream):
            out = mx.distributed.all_gather(a, group=self.group)
            mx.eval(out)
        return np.array(out)


SINGLE = Group()


def launched() -> bool:
    """Whether ``mlx.launch`` started this process as one rank of a group."""
    return LAUNCH_ENV in os.environ


def init() -> Group:
    """The group this process belongs to: ``mlx.launch``'s (any backend it set up), or a
    group of one when it was not launched that way."""
    if not launched():
        return SINGLE
    try:
        group = mx.distributed.init(strict=True)
    except (RuntimeError, ValueError) as e:
        raise GroupError(f"this process was started as rank {os.environ[LAUNCH_ENV]} of a "
                         f"group (by mlx.launch), but the group could not be formed: {e}") from None
    return Group(group) if group.size() > 1 else SINGLE
