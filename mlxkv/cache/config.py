"""``CacheConfig`` and ``make_cache``: the cache settings of a model, checked up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..budget import format_bytes, parse_bytes, token_bytes
from ..errors import InputError
from ..kernels import kernel_mode
from ..policies import known_policies, make_policy
from .layout import make_layout
from .codebook import CODEBOOK_BITS
from .codec import BITS, GROUP_SIZES, QUANTS, default_group
from .full import FullCache
from .fused import preflight
from .quantized import QuantizedCache
from .adaptive import AdaptiveScoredCache
from .scored import ScoredCache
from .window import WindowCache

KEY_MODES = ("token", "channel")
MAX_OUTLIERS = 8  # values kept exactly per key vector
HADAMARD_BASES = (1, 12, 20, 28)


def _hadamard_size(n: int) -> bool:
    """Whether ``mx.hadamard_transform`` takes vectors of ``n``: 2^k times 1, 12, 20, 28."""
    while n % 2 == 0 and n not in HADAMARD_BASES:
        n //= 2
    return n in HADAMARD_BASES


@dataclass(frozen=True)
class CacheConfig:
    """What cache each attention layer gets.

    - no bits, no window: ``FullCache`` (mlx-lm's KVCache);
    - ``key_bits``/``value_bits``: ``QuantizedCache`` (2, 3, 4 or 8 bits each; one of them
      may stay None = full precision), ``group_size`` 32/64/128 (None: 64, or the
      largest that divides the model's head dim, see ``resolve``), ``key_mode`` "token" or
      "channel" (KIVI), ``residual`` recent tokens at full precision, ``rotate`` keys with
      a randomized Hadamard transform, ``start``: tokens seen before quantizing begins;
      ``quant``: "affine" (groups with a scale and bias) or "codebook" (each vector
      rotated, its coordinates coded with the optimal codebook of their known
      distribution: 2, 3 or 4 bits plus one float16 scale per vector; ``codebook.py``);
      ``sketch``: codebook keys also keep a 1-bit sign sketch of their residual (QJL:
      unbiased scores, +1 bit and a float16 norm per key);
      ``outliers``: codebook keys keep their ``outliers`` largest values exactly (+3
      bytes each: channel and float16 value), the rest is coded (KVQuant's
      dense-and-sparse: a few key channels carry much of a head's energy);
      ``middle``: bits by token age: the ``middle`` tokens before the residual are kept at
      ``middle_bits`` (default 4, more than the ring's), the older ones at the ring's bits
      (e.g. 2-bit codebook with a 4-bit middle of 512 tokens); sides at full precision
      stay so;
    - ``window``: ``WindowCache`` of ``sinks`` + ``window`` recent tokens, quantized when
      bits are set;
    - ``budget`` (bytes, or a size such as "64MB"): the whole model's KV never takes more.
      It is split evenly over the attention layers; each layer keeps its sinks and most
      recent tokens at full precision, older tokens quantized (when bits are set) and
      evicts the oldest beyond that. ``window`` is then derived from the budget;
    - ``policy``: what a window or budgeted cache evicts (see ``mlxkv.policies``):
      ``window`` keeps the most recent tokens, the others the top-scoring ones;
    - ``allocator``: how a budget is split: ``uniform``, ``pyramid`` (PyramidKV: lower
      layers get more, linearly from 1.5x to 0.5x of the mean) or ``adaptive`` (AdaKV:
      even over layers, and within a layer the kv heads share one pool of slots, filled
      by the policy's scores across heads; needs a scoring policy and batch size 1).
    """

    key_bits: int | None = None
    value_bits: int | None = None
    group_size: int | None = None
    key_mode: str = "token"
    residual: int = 0
    rotate: bool = False
    window: int | None = None
    sinks: int = 4
    start: int = 0
    seed: int = 0
    budget: int | None = None
    policy: str = "window"
    allocator: str = "uniform"
    quant: str = "affine"
    sketch: bool = False
    outliers: int = 0
    middle: int = 0
    middle_bits: int = 4

    def __post_init__(self):
        if self.budget is not None:  # parsed once, here: a size such as "64MB" -> bytes
            object.__setattr__(self, "budget", parse_bytes(self.budget))

    @property
    def quantized(self) -> bool:
        return self.key_bits is not None or self.value_bits is not None

    @property
    def kind(self) -> str:
        if self.budget is not None:
            return "budget"
        return "window" if self.window is not None else "quantized" if self.quantized else "full"

    def check(self, head_dim: int | None = None) -> "CacheConfig":
        problems = []
        for name in ("key_bits", "value_bits"):
            b = getattr(self, name)
            if b is not None and b not in BITS:
                problems.append(f"{name} must be one of {BITS} (got {b})")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            problems.append(f"group_size must be one of {GROUP_SIZES} (got {self.group_size})")
        elif head_dim is not None and self.quantized and self.quant != "codebook":
            if self.group_size is None and default_group(head_dim) is None:
                problems.append(f"no supported group size {GROUP_SIZES} divides the head dim "
                                f"{head_dim}: this model's KV cannot be quantized (leave bits off)")
            elif self.group_size is not None and head_dim % self.group_size:
                problems.append(f"group_size {self.group_size} does not divide the head dim "
                                f"{head_dim} (leave it unset to pick one that does)")
        if self.quant not in QUANTS:
            problems.append(f"quant must be one of {QUANTS} (got {self.quant!r})")
        elif self.quant == "codebook":
            for name in ("key_bits", "value_bits"):
                b = getattr(self, name)
                if b is not None and b not in CODEBOOK_BITS:
                    problems.append(f"codebook {name} must be one of {CODEBOOK_BITS} (got {b})")
            if self.key_mode != "token":
                problems.append("codebook keys are coded per token (key_mode 'token')")
            if head_dim is not None and self.quantized and not (
                    _hadamard_size(head_dim) and head_dim % 32 == 0):
                problems.append(f"the codebook needs a head dim of 2^k times 1, 12, 20 or 28 "
                                f"that is a multiple of 32 (got {head_dim})")
        if self.sketch and (self.quant != "codebook" or self.key_bits is None):
            problems.append("sketch applies to codebook keys (quant 'codebook' with key_bits)")
        if self.outliers and (self.quant != "codebook" or self.key_bits is None):
            problems.append("outliers apply to codebook keys (quant 'codebook' with key_bits)")
        elif not 0 <= self.outliers <= MAX_OUTLIERS:
            problems.append(f"outliers must be 0 to {MAX_OUTLIERS} per key (got {self.outliers})")
        elif self.outliers and head_dim is not None and head_dim > 256:
            problems.append(f"outliers need a head dim of at most 256 (got {head_dim})")
        if self.key_mode not in KEY_MODES:
            problems.append(f"key_mode must be one of {KEY_MODES} (got {self.key_mode!r})")
        if self.key_mode == "channel" and self.key_bits is None:
            problems.append("key_mode 'channel' needs key_bits")
        if self.residual < 0:
            problems.append("residual must be >= 0")
        if self.middle < 0:
            problems.append("middle must be >= 0")
        if self.middle and not self.quantized:
            problems.append("middle only applies to a quantized cache (set key/value bits)")
        elif self.middle:
            allowed = CODEBOOK_BITS if self.quant == "codebook" else BITS
            below = [b for b in (self.key_bits, self.value_bits) if b is not None]
            if self.middle_bits not in allowed:
                problems.append(f"middle_bits must be one of {allowed} (got {self.middle_bits})")
            elif self.middle_bits <= max(below):
                problems.append(f"middle_bits ({self.middle_bits}) must be more than the older "
                                f"tokens' bits ({max(below)}): the middle holds newer tokens")
        if self.residual and not self.quantized:
            problems.append("residual only applies to a quantized cache (set key/value bits)")
        if self.rotate and self.key_bits is None:
            problems.append("rotate only applies to quantized keys (set key_bits)")
        if self.rotate and head_dim is not None and not _hadamard_size(head_dim):
            problems.append(f"rotate needs a head dim of 2^k times 1, 12, 20 or 28 (got {head_dim})")
        if self.start < 0:
            problems.append("start must be >= 0")
        if self.window is not None:
            if self.window < 1:
                problems.append(f"window must be >= 1 (got {self.window})")
            if self.sinks < 0:
                problems.append("sinks must be >= 0")
            if self.start:
                problems.append("start applies to the growing quantized cache, not to a window")
            if self.quantized and self.window <= self.residual + self.middle:
                held = "the residual" + (" and middle" if self.middle else "")
                problems.append(f"window ({self.window}) must be larger than {held} "
                                f"({self.residual + self.middle})")
        if self.policy not in known_policies():
            problems.append(f"unknown policy {self.policy!r} (known: {', '.join(known_policies())})")
        elif self.policy != "window":
            if self.window is None and self.budget is None:
                problems.append(f"policy {self.policy!r} evicts from a window or budget cache "
                                "(set a budget or a window)")
            if self.key_mode != "token":
                problems.append(f"policy {self.policy!r} evicts single tokens: keys must be "
                                "grouped per token (key_mode 'token')")
        if self.allocator not in ALLOCATORS:
            problems.append(f"unknown allocator {self.allocator!r} (known: {', '.join(ALLOCATORS)})")
        elif self.allocator == "adaptive" and self.policy == "window":
            problems.append("the adaptive allocator shares slots between heads by their scores: "
                            "choose a scoring policy (e.g. policy 'snapkv')")
        if self.budget is not None:
            if self.window is not None:
                problems.append("give a budget or a window, not both (the budget sets the window)")
            if self.start:
                problems.append("start applies to the growing quantized cache, not to a budget")
        if problems:
            raise InputError("invalid cache settings: " + "; ".join(problems))
        return self

    def resolve(self, head_dim: int) -> "CacheConfig":
        """This config checked against a model's head dim, with the group size chosen when
        none was given (``default_group``)."""
        self.check(head_dim)
        if self.group_size is None and self.quantized:
            return self.replace(group_size=default_group(head_dim))
        return self

    def replace(self, **changes) -> "CacheConfig":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise InputError(f"unknown cache setting(s): {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(known))})")
        return CacheConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == "full":
            return "full precision"
        parts = []
        if self.quantized:
            kb = f"{self.key_bits}-bit" if self.key_bits else "fp"
            vb = f"{self.value_bits}-bit" if self.value_bits else "fp"
            if self.quant == "codebook":
                extra = (" + sketch" if self.sketch else "") + (
                    f" + {self.outliers} outlier{'s' * (self.outliers > 1)}" if self.outliers else "")
                parts.append(f"K {kb}{extra} V {vb} codebook")
            else:
                parts.append(f"K {kb} ({self.key_mode}) V {vb}, group {self.group_size or 'auto'}")
            if self.middle:
                parts.append(f"{self.middle_bits}-bit middle {self.middle}")
            if self.residual:
                parts.append(f"residual {self.residual}")
            if self.rotate:
                parts.append("rotated keys")
        if self.window is not None:
            parts.append(f"window {self.window} + {self.sinks} sinks")
        if self.budget is not None:
            parts.append(f"budget {format_bytes(self.budget)}")
            if self.allocator != "uniform":
                parts.append(f"{self.allocator} allocation")
        if self.policy != "window":
            parts.append(f"policy {self.policy}")
        return ", ".join(parts)

    def layout_settings(self) -> dict:
        """The settings that shape a layer's storage (``layout.make_layout``'s words)."""
        return dict(key_bits=self.key_bits, value_bits=self.value_bits,
                    group_size=self.group_size, key_mode=self.key_mode, residual=self.residual,
                    quant=self.quant, sketch=self.sketch, outliers=self.outliers,
                    middle=self.middle, middle_bits=self.middle_bits)

    def layer_cache(self, layer: int, window: int | None = None, budget: int | None = None):
        """The cache of one layer; a budgeted layer gets the window its ``budget`` holds."""
        window = window or self.window
        if window is not None:
            args = dict(window=window, sinks=self.sinks, **self.layout_settings(),
                        rotate=self.rotate, seed=self.seed + layer, budget=budget)
            if self.policy != "window" and self.allocator == "adaptive":
                return AdaptiveScoredCache(policy=make_policy(self.policy), **args)
            if self.policy != "window":
                return ScoredCache(policy=make_policy(self.policy), **args)
            return WindowCache(**args)
        if self.quantized:
            return QuantizedCache(**self.layout_settings(), rotate=self.rotate, start=self.start,
                                  seed=self.seed + layer)
        return FullCache()


def make_cache(model, config: CacheConfig | None = None, *, batch_size: int = 1) -> list:
    """Per-layer caches for ``model``: the model's own cache layout (from mlx-lm), with
    every plain full-attention ``KVCache`` replaced by the cache ``config`` asks for.
    Layers with a cache of their own kind (sliding-window, state-space) keep it.
    ``batch_size``: the sequences fed at once (the adaptive allocator takes one)."""
    from .route import (is_routed, learned_sinks, model_dtype, model_group, model_head_dim,
                        model_kv_heads, model_q_heads)

    config = (config or CacheConfig()).resolve(model_head_dim(model))
    if config.allocator == "adaptive" and batch_size != 1:
        raise InputError(f"the adaptive allocator keeps one sequence (batch size 1, got "
                         f"{batch_size}): use allocator 'uniform' or 'pyramid' for batches")
    kernel_mode()  # a bad MLXKV_KERNELS is reported now, not at the first decode step
    if config.kind != "full":
        if learned_sinks(model):
            raise InputError(f"{type(model).__module__.split('.')[-1]} models have learned "
                             "attention sinks, which mlxkv's compressed caches do not support: "
                             "use the full cache (no --kv-bits, --kv-window or --kv-budget)")
        if not is_routed(model):
            raise InputError("this model's attention is not routed to mlxkv's caches: call "
                             "mlxkv.route(model) first (models from mlxkv.load are routed)")
    caches = make_prompt_cache(model)
    ours = [i for i, c in enumerate(caches) if type(c) is KVCache]
    budgets = [None] * len(ours)
    if config.budget is not None:  # a group's budget: each rank holds its share
        budgets = allocate(config.budget // model_group(model).size, len(ours), config.allocator)
    for n, i in enumerate(ours):
        window = None if budgets[n] is None else budget_window(model, config, budgets[n], len(ours))
        caches[i] = config.layer_cache(i, window, budgets[n])
    if ours and config.kind != "full":
        # every layer's cache uses the same kernels: compile them now, not mid-generation
        preflight(caches[ours[0]], dtype=model_dtype(model), head_dim=model_head_dim(model),
                  gqa=model_q_heads(model) // model_kv_heads(model))
    return caches


ALLOCATORS = ("uniform", "pyramid", "adaptive")


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


def budget_window(model, config: CacheConfig, per_layer: int, n_layers: int) -> int:
    """The window a layer can keep within ``per_layer`` bytes: sinks and residual buffer
    at full precision, the middle in its codecs, the rest in the ring's codecs (plus, for
    a scoring policy, each slot's score and position)."""
    from .route import model_dtype, model_head_dim, model_kv_heads

    head_dim = model_head_dim(model)
    kv_heads = model_kv_heads(model)
    dtype_size = model_dtype(model).size
    lay = make_layout(**config.layout_settings())
    unit = lay.unit
    pair = lambda kc, vc: (token_bytes(kc, head_dim, kv_heads, dtype_size)  # noqa: E731
                           + token_bytes(vc, head_dim, kv_heads, dtype_size))
    full = 2 * kv_heads * head_dim * dtype_size  # one token's K and V at full precision
    fixed = (config.sinks + config.residual + unit) * full
    if lay.middle:
        fixed += lay.middle_capacity * pair(lay.mkc, lay.mvc)  # its buffer
    ring_token = pair(lay.kc, lay.vc)
    if config.policy != "window":
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

