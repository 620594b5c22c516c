"""``CacheConfig``: the cache settings of a model, checked up front (``plan.py`` sizes
the caches they give a model, ``make.py`` builds them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..budget import format_bytes, parse_bytes
from ..errors import InputError
from . import checks
from .checks import ALLOCATORS, FLOOR, KEY_MODES, RECENT
from .codec import BITS, GROUP_SIZES, QUANTS, default_group
from .spec import declared, setting


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
      by the policy's scores across heads; needs a scoring policy and batch size 1);
    - ``recent``: the newest tokens a scoring policy never evicts; ``floor``: the share of
      a head's slots the adaptive allocator always keeps for it.

    Each field is a ``spec.setting``: how it is read from words and shown is declared
    with it (``spec.py``).
    """

    key_bits: int | None = setting(None, kind="count", choices=BITS, nullable=True,
                                   help="bits for keys (overrides --kv-bits)")
    value_bits: int | None = setting(None, kind="count", choices=BITS, nullable=True,
                                     help="bits for values (overrides --kv-bits)")
    group_size: int | None = setting(
        None, kind="count", choices=GROUP_SIZES, nullable=True,
        help="quantization group size (default: 64, or the largest dividing the head dim)")
    key_mode: str = setting("token", kind="text", choices=KEY_MODES,
                            help="group keys per token or per channel (KIVI)")
    residual: int = setting(0, kind="count", help="most recent tokens kept at full precision")
    rotate: bool = setting(False, kind="flag",
                           help="randomized Hadamard rotation of keys before quantizing")
    window: int | None = setting(None, kind="count", nullable=True,
                                 help="keep only sinks + this many recent tokens")
    sinks: int = setting(4, kind="count", help="attention sinks kept with a window (default 4)")
    start: int = setting(0, kind="count", help="tokens seen before quantizing starts")
    seed: int = setting(0, kind="count", help="seed of the rotations (per layer: seed + layer)")
    budget: int | None = setting(
        None, kind="size", nullable=True, metavar="SIZE",
        help="bytes the whole model's KV may take, e.g. 64MB or 48MiB ('off': none); the cache "
             "keeps sinks + the most recent tokens that fit (quantized with --kv-bits); "
             "`mlxkv chat` defaults to 64MB at 8 bits")
    policy: str = setting(
        "window", kind="policy", metavar="NAME[:KEY=VALUE,...]",
        help="what a budget or window cache evicts (default: window, the sinks + the most "
             "recent tokens); a scoring policy's parameters after a colon, e.g. "
             "snapkv:window=32,kernel=7")
    allocator: str = setting(
        "uniform", kind="text", choices=ALLOCATORS,
        help="how a budget is split: uniform (default), pyramid (more for lower layers) or "
             "adaptive (kv heads of a layer share slots by score)")
    quant: str = setting(
        "affine", kind="text", choices=QUANTS,
        help="how bits are spent: affine groups (default) or codebook (rotated vectors, "
             "optimal codebook: near-lossless at 3 bits, 2-4 bits)")
    sketch: bool = setting(False, kind="flag",
                           help="codebook keys also keep a 1-bit sign sketch of their residual "
                                "(unbiased scores, +1 bit per element)")
    outliers: int = setting(0, kind="count", metavar="N",
                            help="codebook keys keep their N largest values exactly (+3 bytes "
                                 "each; 1 costs 0.375 bits per element at head dim 64)")
    middle: int = setting(0, kind="count", metavar="TOKENS",
                          help="bits by token age: the tokens before the residual kept at "
                               "--kv-middle-bits, older ones at --kv-bits (e.g. --kv-quant "
                               "codebook --kv-bits 2 --kv-middle 512)")
    middle_bits: int = setting(4, kind="count", choices=BITS,
                               help="bits of the middle tokens (default 4; more than --kv-bits)")
    recent: int = setting(RECENT, kind="count", describe=lambda v: f"{v} recent kept",
                          help="newest tokens a scoring policy never evicts (default 32)")
    floor: float = setting(FLOOR, kind="fraction", describe=lambda v: f"floor {v:g}",
                           help="the adaptive allocator's share of a head's slots it always "
                                "keeps (AdaKV's safeguard, default 0.2)")

    def __post_init__(self):
        if self.budget is not None:  # parsed once, here: a size such as "64MB" -> bytes
            object.__setattr__(self, "budget", parse_bytes(self.budget))
        # one spelling of a policy and its parameters ("SnapKV: window = 8" -> "snapkv:window=8"),
        # so equal settings are equal configs (checked by ``check``, not here)
        name, _, params = self.policy.partition(":")
        params = ",".join(p.replace(" ", "") for p in params.split(",") if p.strip())
        object.__setattr__(self, "policy", name.strip().lower() + (":" + params if params else ""))

    @property
    def quantized(self) -> bool:
        return self.key_bits is not None or self.value_bits is not None

    @property
    def policy_name(self) -> str:
        """The policy without its parameters (``snapkv`` of ``snapkv:window=32``)."""
        return self.policy.partition(":")[0]

    @property
    def kind(self) -> str:
        if self.budget is not None:
            return "budget"
        return "window" if self.window is not None else "quantized" if self.quantized else "full"

    def check(self, head_dim: int | None = None) -> "CacheConfig":
        """This config, if its settings fit together (and a model's ``head_dim``, given);
        else an ``InputError`` naming every problem (``checks.py``)."""
        problems = checks.problems(self, head_dim)
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
        if self.policy_name != "window":
            parts.append(f"policy {self.policy}")
        for name, (spec, default) in declared(CacheConfig).items():
            value = getattr(self, name)
            if spec.describe is not None and value != default:
                parts.append(spec.describe(value))
        return ", ".join(parts)

    def layout_settings(self) -> dict:
        """The settings that shape a layer's storage (``layout.make_layout``'s words)."""
        return dict(key_bits=self.key_bits, value_bits=self.value_bits,
                    group_size=self.group_size, key_mode=self.key_mode, residual=self.residual,
                    quant=self.quant, sketch=self.sketch, outliers=self.outliers,
                    middle=self.middle, middle_bits=self.middle_bits)


def __getattr__(name: str):
    # ``make_cache`` lived here until 0.2: users' ``from mlxkv.cache.config import
    # make_cache`` keeps working (imported on use: make.py imports this module)
    if name == "make_cache":
        from .make import make_cache

        return make_cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
