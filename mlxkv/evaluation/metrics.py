"""Quality metrics of cache configs against the full-precision cache: perplexity of a
text fed in chunks (each chunk attends to the compressed cache of the text before it),
KL divergence of the next-token distributions and top-1 agreement, position by position."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from ..errors import InputError
from ..presets import BASELINE as REFERENCE


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kl_divergence(ref_logp: mx.array, logp: mx.array) -> mx.array:
    """KL(P_ref || P) per row, from log-probabilities (..., V) -> (...)."""
    return (mx.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)


def nll(logp: mx.array, targets: mx.array) -> mx.array:
    """Negative log-likelihood of ``targets`` (N,) under ``logp`` (N, V) -> (N,)."""
    return -mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def perplexity(total_nll: float, count: int) -> float:
    return math.exp(total_nll / count)


def kv_elements(model, cache) -> int:
    """Elements an fp cache of the tokens ``cache`` holds would have (K and V)."""
    from ..cache.shape import shape_of

    # mlx-lm's QuantizedKVCache does not report a size: it holds every token seen.
    shape = shape_of(model)
    return sum(2 * shape.kv_heads * shape.head_dim * (c.size() or c.offset) for c in cache)


@dataclass
class EvalRow:
    config: str
    kv_bytes: int = 0
    bits_per_element: float = 0.0
    ppl: float = float("nan")
    ppl_delta_pct: float = 0.0
    kld: float = 0.0
    top1: float = 1.0
    passkey: dict[str, float] = field(default_factory=dict)  # "length@depth" -> accuracy

    @property
    def passkey_accuracy(self) -> float | None:
        return sum(self.passkey.values()) / len(self.passkey) if self.passkey else None


def quality(model, tokens: list[int], factories: dict[str, Callable[[], list]], *,
            chunk: int = 256, step: Callable[[], None] | None = None) -> dict[str, EvalRow]:
    """Perplexity, KLD and top-1 agreement of every config against the reference cache,
    all fed the same chunks side by side (no reference logits are stored); ``step()``
    after each chunk."""
    if len(tokens) < 2:
        raise InputError("the text is too short: it needs at least 2 tokens")
    from mlx_lm.models.cache import KVCache

    names = list(factories)
    caches = {REFERENCE: [KVCache() for _ in model.layers]}
    caches.update({n: factories[n]() for n in names if n != REFERENCE})
    sums = {n: {"nll": 0.0, "kl": 0.0, "top1": 0} for n in caches}
    x = mx.array(tokens)
    count = len(tokens) - 1
    for s in range(0, count, chunk):
        inp, targets = x[s:min(s + chunk, count)][None], x[s + 1:min(s + chunk, count) + 1]
        ref = log_softmax(model(inp, cache=caches[REFERENCE])[0])
        ref_top = ref.argmax(axis=-1)
        for n, cache in caches.items():
            logp = ref if n == REFERENCE else log_softmax(model(inp, cache=cache)[0])
            vals = [nll(logp, targets).sum(), kl_divergence(ref, logp).sum(),
                    (logp.argmax(axis=-1) == ref_top).sum()]
            mx.eval(vals)
            sums[n]["nll"] += vals[0].item()
            sums[n]["kl"] += vals[1].item()
            sums[n]["top1"] += vals[2].item()
        if step is not None:
            step()
    ref_ppl = perplexity(sums[REFERENCE]["nll"], count)
    rows = {}
    for n, cache in caches.items():
        if n not in factories and n != REFERENCE:
            continue
        kv = sum(c.nbytes for c in cache)
        ppl = perplexity(sums[n]["nll"], count)
        rows[n] = EvalRow(config=n, kv_bytes=kv, bits_per_element=8 * kv / max(kv_elements(model, cache), 1),
                          ppl=ppl, ppl_delta_pct=100 * (ppl / ref_ppl - 1),
                          kld=sums[n]["kl"] / count, top1=sums[n]["top1"] / count)
    return rows
