"""``CacheConfig``: the cache settings of a model, checked up front (``plan.py`` sizes
the caches they give a model, ``make.py`` builds them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..budget import format_bytes, parse_bytes
from ..errors import InputError
from ..policies import known_policies
from .codebook import CODEBOOK_BITS
from .codec import BITS, GROUP_SIZES, QUANTS, default_group

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


ALLOCATORS = ("uniform", "pyramid", "adaptive")


def __getattr__(name: str):
    # ``make_cache`` lived here until 0.2: users' ``from mlxkv.cache.config import
    # make_cache`` keeps working (imported on use: make.py imports this module)
    if name == "make_cache":
        from .make import make_cache

        return make_cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
