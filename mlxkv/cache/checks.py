"""Whether a ``CacheConfig``'s settings fit together (and fit a model's head dim): one
function per part of the cache, each naming what to change. ``problems`` runs them all
so one error lists every problem."""

from __future__ import annotations

from ..policies import make_policy
from ..errors import InputError
from .codebook import CODEBOOK_BITS
from .codec import BITS, GROUP_SIZES, QUANTS, default_group

KEY_MODES = ("token", "channel")
ALLOCATORS = ("uniform", "pyramid", "adaptive")
MAX_OUTLIERS = 8  # values kept exactly per key vector
HADAMARD_BASES = (1, 12, 20, 28)
RECENT = 32   # newest tokens a scoring policy never evicts, by default
FLOOR = 0.2   # share of a head's slots the adaptive allocator keeps for it, by default


def hadamard_size(n: int) -> bool:
    """Whether ``mx.hadamard_transform`` takes vectors of ``n``: 2^k times 1, 12, 20, 28."""
    while n % 2 == 0 and n not in HADAMARD_BASES:
        n //= 2
    return n in HADAMARD_BASES


def codecs(c, head_dim: int | None) -> list[str]:
    """Bits, group size, quantizer, codebook extras and key grouping."""
    problems = []
    for name in ("key_bits", "value_bits"):
        b = getattr(c, name)
        if b is not None and b not in BITS:
            problems.append(f"{name} must be one of {BITS} (got {b})")
    if c.group_size is not None and c.group_size not in GROUP_SIZES:
        problems.append(f"group_size must be one of {GROUP_SIZES} (got {c.group_size})")
    elif head_dim is not None and c.quantized and c.quant != "codebook":
        if c.group_size is None and default_group(head_dim) is None:
            problems.append(f"no supported group size {GROUP_SIZES} divides the head dim "
                            f"{head_dim}: this model's KV cannot be quantized (leave bits off)")
        elif c.group_size is not None and head_dim % c.group_size:
            problems.append(f"group_size {c.group_size} does not divide the head dim "
                            f"{head_dim} (leave it unset to pick one that does)")
    if c.quant not in QUANTS:
        problems.append(f"quant must be one of {QUANTS} (got {c.quant!r})")
    elif c.quant == "codebook":
        for name in ("key_bits", "value_bits"):
            b = getattr(c, name)
            if b is not None and b not in CODEBOOK_BITS:
                problems.append(f"codebook {name} must be one of {CODEBOOK_BITS} (got {b})")
        if c.key_mode != "token":
            problems.append("codebook keys are coded per token (key_mode 'token')")
        if head_dim is not None and c.quantized and not (
                hadamard_size(head_dim) and head_dim % 32 == 0):
            problems.append(f"the codebook needs a head dim of 2^k times 1, 12, 20 or 28 "
                            f"that is a multiple of 32 (got {head_dim})")
    if c.sketch and (c.quant != "codebook" or c.key_bits is None):
        problems.append("sketch applies to codebook keys (quant 'codebook' with key_bits)")
    if c.outliers and (c.quant != "codebook" or c.key_bits is None):
        problems.append("outliers apply to codebook keys (quant 'codebook' with key_bits)")
    elif not 0 <= c.outliers <= MAX_OUTLIERS:
        problems.append(f"outliers must be 0 to {MAX_OUTLIERS} per key (got {c.outliers})")
    elif c.outliers and head_dim is not None and head_dim > 256:
        problems.append(f"outliers need a head dim of at most 256 (got {head_dim})")
    if c.key_mode not in KEY_MODES:
        problems.append(f"key_mode must be one of {KEY_MODES} (got {c.key_mode!r})")
    if c.key_mode == "channel" and c.key_bits is None:
        problems.append("key_mode 'channel' needs key_bits")
    return problems


def tiers(c, head_dim: int | None) -> list[str]:
    """The residual, the middle, rotation and the start of quantizing."""
    problems = []
    if c.residual < 0:
        problems.append("residual must be >= 0")
    if c.middle < 0:
        problems.append("middle must be >= 0")
    if c.middle and not c.quantized:
        problems.append("middle only applies to a quantized cache (set key/value bits)")
    elif c.middle:
        allowed = CODEBOOK_BITS if c.quant == "codebook" else BITS
        below = [b for b in (c.key_bits, c.value_bits) if b is not None]
        if c.middle_bits not in allowed:
            problems.append(f"middle_bits must be one of {allowed} (got {c.middle_bits})")
        elif c.middle_bits <= max(below):
            problems.append(f"middle_bits ({c.middle_bits}) must be more than the older "
                            f"tokens' bits ({max(below)}): the middle holds newer tokens")
    if c.residual and not c.quantized:
        problems.append("residual only applies to a quantized cache (set key/value bits)")
    if c.rotate and c.key_bits is None:
        problems.append("rotate only applies to quantized keys (set key_bits)")
    if c.rotate and head_dim is not None and not hadamard_size(head_dim):
        problems.append(f"rotate needs a head dim of 2^k times 1, 12, 20 or 28 (got {head_dim})")
    if c.start < 0:
        problems.append("start must be >= 0")
    return problems


def window(c) -> list[str]:
    """A window of sinks + recent tokens."""
    if c.window is None:
        return []
    problems = []
    if c.window < 1:
        problems.append(f"window must be >= 1 (got {c.window})")
    if c.sinks < 0:
        problems.append("sinks must be >= 0")
    if c.start:
        problems.append("start applies to the growing quantized cache, not to a window")
    if c.quantized and c.window <= c.residual + c.middle:
        held = "the residual" + (" and middle" if c.middle else "")
        problems.append(f"window ({c.window}) must be larger than {held} "
                        f"({c.residual + c.middle})")
    return problems


def eviction(c) -> list[str]:
    """The policy (and its parameters), the tokens it keeps and the budget's allocator."""
    problems = []
    try:
        name = make_policy(c.policy).name  # its parameters checked by the policy itself
    except InputError as e:
        problems.append(str(e))
        name = None
    if name is not None and name != "window":
        if c.window is None and c.budget is None:
            problems.append(f"policy {name!r} evicts from a window or budget cache "
                            "(set a budget or a window)")
        if c.key_mode != "token":
            problems.append(f"policy {name!r} evicts single tokens: keys must be "
                            "grouped per token (key_mode 'token')")
    if c.recent < 0:
        problems.append(f"recent must be >= 0 (got {c.recent})")
    elif c.recent != RECENT and name == "window":
        problems.append("recent applies to a scoring policy (e.g. policy 'snapkv'): the window "
                        "policy keeps only recent tokens")
    if not 0 <= c.floor <= 1:
        problems.append(f"floor is a share of a head's slots, 0 to 1 (got {c.floor})")
    elif c.floor != FLOOR and c.allocator != "adaptive":
        problems.append("floor applies to the adaptive allocator (allocator 'adaptive')")
    if c.allocator not in ALLOCATORS:
        problems.append(f"unknown allocator {c.allocator!r} (known: {', '.join(ALLOCATORS)})")
    elif c.allocator == "adaptive" and name == "window":
        problems.append("the adaptive allocator shares slots between heads by their scores: "
                        "choose a scoring policy (e.g. policy 'snapkv')")
    return problems


def budget(c) -> list[str]:
    if c.budget is None:
        return []
    problems = []
    if c.window is not None:
        problems.append("give a budget or a window, not both (the budget sets the window)")
    if c.start:
        problems.append("start applies to the growing quantized cache, not to a budget")
    return problems


def problems(c, head_dim: int | None = None) -> list[str]:
    return codecs(c, head_dim) + tiers(c, head_dim) + window(c) + eviction(c) + budget(c)
