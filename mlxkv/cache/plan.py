"""``plan(config, shape) -> CachePlan``: the one sizing code of mlxkv's caches.

A plan says, for each attention layer of a model, what it keeps: its byte budget (a
budget split over layers by the allocator), the window of tokens that budget holds (or
the config's window; None: unbounded), and so the most bytes the model's caches can take
holding a number of tokens. ``make_cache`` builds caches from it; the server reserves
memory by it (``bound_bytes``), ``describe`` says it, eval's bits per element count
against it (``ModelShape``'s full-precision elements).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import format_bytes, token_bytes
from ..errors import InputError
from .config import CacheConfig
from .layout import STEP, make_layout
from .shape import ModelShape

# Slack past the kept tokens, the chunk and a growth step, kept as the server's reservation
# had it before the plan (its own ``+ 128``): a margin, not a derived size.
GROWTH_SLACK = 128


@dataclass(frozen=True)
class LayerPlan:
    index: int              # the layer's entry in the model's cache list
    budget: int | None      # bytes this layer may take (None: not budgeted)
    window: int | None      # tokens it keeps besides its sinks (None: unbounded)


@dataclass(frozen=True)
class CachePlan:
    config: CacheConfig     # resolved against the model's head dim
    shape: ModelShape
    layers: tuple[LayerPlan, ...]

    def bound_bytes(self, tokens: int, chunk: int) -> int:
        """The most the caches take holding ``tokens`` tokens fed in chunks of ``chunk``:
        the budget, or (no budget) every kept token at full precision, buffers rounded up
        to their growth step plus a chunk, sinks and residual (a bound, not an estimate).
        In a group: the whole group's, as ``--kv-total`` and the stats count."""
        c = self.config
        if c.budget is not None:
            return c.budget
        kept = tokens if c.window is None else min(tokens, c.window + c.sinks)
        rows = -(-kept // STEP) * STEP + chunk + STEP + c.sinks + c.residual + GROWTH_SLACK
        s = self.shape
        per_token = 2 * s.kv_heads * s.head_dim * s.dtype.size
        return s.identity["layers"] * rows * per_token * s.group.size  # every layer, as before

    def describe(self) -> str:
        """The config in words, with the window a budget buys each layer."""
        text = self.config.describe()
        windows = sorted({lp.window for lp in self.layers if lp.budget is not None})
        if windows:
            kept = f"{windows[0]}" if len(windows) == 1 else f"{windows[0]}-{windows[-1]}"
            text += f" (keeps {kept} tokens + {self.config.sinks} sinks a layer)"
        return text


def plan(config: CacheConfig | None, shape: ModelShape) -> CachePlan:
    """The caches ``config`` gives a model of ``shape``: checked against the model (an
    ``InputError`` names what does not fit)."""
    config = (config or CacheConfig()).resolve(shape.head_dim)
    ours = shape.attention_layers
    budgets: list = [None] * len(ours)
    if config.budget is not None:  # a group's budget: each rank holds its share
        budgets = allocate(config.budget // shape.group.size, len(ours), config.allocator)
    windows = {b: budget_window(shape, config, b) for b in set(budgets) if b is not None}
    layers = tuple(LayerPlan(i, b, config.window if b is None else windows[b])
                   for i, b in zip(ours, budgets))
    return CachePlan(config, shape, layers)


def allocate(total: int, n_layers: int, allocator: str = "uniform") -> list[int]:
    """Per-layer byte budgets that add up to ``total`` exactly."""
    if allocator == "pyramid" and n_layers > 1:
        weights = [1.5 - i / (n_layers - 1) for i in range(n_layers)]
    else:
        weights = [1.0] * n_layers
    shares = [int(total * w / sum(weights)) for w in weights]
    for i in range(total - sum(shares)):
        shares[i % n_layers] += 1
    return shares


def budget_window(shape: ModelShape, config: CacheConfig, per_layer: int) -> int:
    """The window a layer can keep within ``per_layer`` bytes: sinks and residual buffer
    at full precision, the middle in its codecs, the rest in the ring's codecs (plus, for
    a scoring policy, each slot's score and position)."""
    head_dim, kv_heads, dtype_size = shape.head_dim, shape.kv_heads, shape.dtype.size
    lay = make_layout(**config.layout_settings())
    unit = lay.unit
    pair = lambda kc, vc: (token_bytes(kc, head_dim, kv_heads, dtype_size)  # noqa: E731
                           + token_bytes(vc, head_dim, kv_heads, dtype_size))
    full = 2 * kv_heads * head_dim * dtype_size  # one token's K and V at full precision
    fixed = (config.sinks + config.residual + unit) * full
    if lay.middle:
        fixed += lay.middle_capacity * pair(lay.mkc, lay.mvc)  # its buffer
    ring_token = pair(lay.kc, lay.vc)
    if config.policy_name != "window":
        ring_token += kv_heads * 8  # float32 score + int32 position per slot and head
        # float32 score of each token not yet in it
        fixed += (lay.held_back + unit + lay.middle_unit) * kv_heads * 4
    if config.allocator == "adaptive":
        ring_token += kv_heads * 4  # int32 head id per slot of the shared pool
    ring = int((per_layer - fixed) // ring_token) // unit * unit
    if ring < unit:
        need = fixed + unit * ring_token
        total = config.budget
        raise InputError(
            f"a KV budget of {format_bytes(total)} is too small for this model and cache: "
            f"a layer's share ({format_bytes(per_layer)}) must be at least {format_bytes(need)} "
            f"for {config.sinks} sinks, the residual{' and middle' if lay.middle else ''} "
            f"and one block of {unit} tokens "
            f"(about {format_bytes(need * total / per_layer)} in all)")
    return ring + config.residual + lay.middle
