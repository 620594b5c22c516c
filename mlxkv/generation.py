"""One streaming decode loop: chunked prefill, mlx-lm sampling, stop rules, live figures.

The loop is mlx-lm's ``generate_step`` with the model's per-layer caches. How a compressed
cache gets the attention call: the model's attention modules call mlx-lm's
``scaled_dot_product_attention``, which ``mlxkv.route(model)`` (done by ``mlxkv.load``)
points at ``mlxkv/cache/route.py``: a cache that owns its attention computes it there
(``cache.attend``), any other cache stays on mlx-lm's path.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .cache.shape import shape_of
from .errors import InputError
from .stats import CacheStats, gather_stats

DEFAULT_PREFILL_STEP = 512
# text, token ids, or a conversation of {"role", "content"} messages (``prompt_tokens``)
Prompt = Union[str, Sequence[int], Sequence[Mapping[str, str]]]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings, checked on construction (names follow mlx-lm's flags)."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if not self.temp >= 0:
            problems.append(f"temp must be >= 0 (got {self.temp})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k must be a whole number >= 0 (got {self.top_k})")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1] (got {self.min_p})")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if self.repetition_context_size < 1:
            problems.append("repetition_context_size must be >= 1")
        if problems:
            raise InputError("invalid sampling settings: " + "; ".join(problems))

    def sampler(self):
        return make_sampler(temp=self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self):
        return make_logits_processors(repetition_penalty=self.repetition_penalty,
                                      repetition_context_size=self.repetition_context_size)


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a streaming generation.

    ``text`` is the new text since the previous event, ``tokens`` the new token ids.
    The last event has ``finish_reason`` set: "eos", "stop" (a stop string), "length"
    (max tokens) or "cancelled"; with "eos" its ``tokens`` hold the end-of-sequence token.
    """

    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int
    generated_tokens: int
    prefill_tps: float
    decode_tps: float
    cache: CacheStats
    finish_reason: str | None = None


def context_length(model) -> int | None:
    return shape_of(model).context


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Text as it is (the tokenizer's BOS added unless the text begins with it), or token ids."""
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special))
    return [int(t) for t in prompt]


def chat_text(tokenizer, messages, *, generation_prompt: bool = True) -> str:
    """``messages`` (role/content dicts) in the model's chat template, as text; a model
    without a template gets plain "role: content" lines. The one place a conversation is
    rendered (generate, chat sessions and passkey prompts all come here)."""
    if not tokenizer.has_chat_template:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if generation_prompt else "")
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                         tokenize=False)


def chat_tokens(tokenizer, messages, *, generation_prompt: bool = True) -> list[int]:
    return encode_prompt(tokenizer, chat_text(tokenizer, messages,
                                              generation_prompt=generation_prompt))


def rendered(tokenizer, text: str) -> bool:
    """Whether ``text`` is already in a prompt format: it begins with one of the
    tokenizer's special tokens (a chat template's ``<|im_start|>``, a BOS)."""
    return any(s and text.startswith(s) for s in tokenizer.all_special_tokens)


def prompt_tokens(tokenizer, prompt: Prompt, *, chat_template: bool = True,
                  system: str | None = None) -> list[int]:
    """The token ids of ``prompt`` as a user means it.

    - token ids: as they are;
    - a list of ``{"role", "content"}`` messages: the conversation in the chat template;
    - text: a user message in the chat template, when the tokenizer has one and
      ``chat_template`` is on, unless the text is already rendered (``rendered``);
      else the text as it is.
    ``system``: a system message put before a text's or the messages' conversation.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty")
        raw = not chat_template or rendered(tokenizer, prompt)
        if raw and system is not None:
            raise InputError("a system message goes into the chat template: it cannot be added "
                             "to raw or already rendered text")
        if raw or (system is None and not tokenizer.has_chat_template):
            return encode_prompt(tokenizer, prompt)
        prompt = [{"role": "user", "content": prompt}]
    prompt = list(prompt)
    if prompt and all(isinstance(m, Mapping) for m in prompt):
        bad = [i for i, m in enumerate(prompt)
               if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)]
        if bad:
            raise InputError(f"message {bad[0]} needs a 'role' and a 'content', both text "
                             f"(got {prompt[bad[0]]!r})")
        if system is not None and any(m["role"] == "system" for m in prompt):
            raise InputError("the messages have a system message already: give it once")
        head = [{"role": "system", "content": system}] if system is not None else []
        return chat_tokens(tokenizer, head + [dict(m) for m in prompt])
    if any(isinstance(t, (str, Mapping)) for t in prompt):
        raise InputError("a prompt is text, a list of token ids, or a list of "
                         "{'role', 'content'} messages (not a mix)")
    if system is not None:
        raise InputError("a system message goes into the chat template: give text or "
                         "messages with it, not token ids")
    return encode_prompt(tokenizer, prompt)


def default_cache(model) -> list:
    from .cache.config import CacheConfig
    from .cache.make import make_cache

    return make_cache(model, CacheConfig())


def _check_context(model, cache, n_new: int, max_tokens: int) -> None:
    limit = context_length(model)
    if limit is None or any(getattr(c, "bounded", False) for c in cache):
        return
    held = cache[0].offset if cache else 0
    if held + n_new > limit:
        raise InputError(
            f"the prompt is {n_new} tokens and the cache holds {held}: that is more than the "
            f"model's context of {limit} tokens (use a window or budgeted cache, e.g. "
            "--kv-window, to go past it)"
        )


class _StopMatcher:
    """Finds stop strings in streamed text, holding back any text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    chat_template: bool = True,
    cache: list | None = None,
    prefill_step: int = DEFAULT_PREFILL_STEP,
    stop: Sequence[str] = (),
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    sampling: Sampling | None = None,
    **sampling_kwargs,
) -> Iterator[GenerationEvent]:
    """Generate from ``prompt``, yielding a ``GenerationEvent`` per token.

    ``prompt``: text (a user message, in the model's chat template unless
    ``chat_template=False`` or the text is already rendered), a list of ``{"role",
    "content"}`` messages, or token ids (fed as they are); see ``prompt_tokens``.

    ``cache`` (a list of per-layer caches from ``mlxkv.make_cache``) is filled in place and
    can be passed again to continue; by default a full-precision cache is made.
    Sampling settings go in ``sampling`` or as keywords (``temp``, ``top_p``, ``top_k``,
    ``min_p``, ``repetition_penalty``, ``seed``).
    """
    sampling = sampling or Sampling(**sampling_kwargs)
    if not (max_tokens >= 1):
        raise InputError(f"max_tokens must be >= 1 (got {max_tokens})")
    if prefill_step < 1:
        raise InputError(f"prefill step must be >= 1 (got {prefill_step})")
    tokens = prompt_tokens(tokenizer, prompt, chat_template=chat_template)
    if not tokens:
        raise InputError("the prompt is empty")
    cache = default_cache(model) if cache is None else cache
    _check_context(model, cache, len(tokens), max_tokens)
    group = shape_of(model).group
    seed = sampling.seed
    if group.size > 1:  # every rank must draw the same tokens: rank 0's seed for all
        seed = group.broadcast(seed if seed is not None else random.randrange(2**31))
    if seed is not None:
        mx.random.seed(seed)

    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer
    detok.reset()
    matcher = _StopMatcher(stop)
    steps = generate_step(
        mx.array(tokens), model, max_tokens=max_tokens, sampler=sampling.sampler(),
        logits_processors=sampling.logits_processors(), prompt_cache=cache,
        prefill_step_size=prefill_step, prompt_progress_callback=progress,
    )

    start = time.perf_counter()
    prefill_tps = decode_tps = 0.0
    first_at = start
    n = 0
    finish = None
    last: tuple[int, ...] = ()
    text = ""
    try:
        for token, _ in steps:
            n += 1
            now = time.perf_counter()
            if n == 1:
                first_at = now
                prefill_tps = len(tokens) / max(now - start, 1e-9)
            else:
                decode_tps = (n - 1) / max(now - first_at, 1e-9)
            last = (token,)
            if token in eos:
                finish = "eos"
                break
            detok.add_token(token)
            text, stopped = matcher.feed(detok.last_segment)
            if stopped:
                finish = "stop"
                break
            if n >= max_tokens:
                finish = "length"
                break
            # in a group the ranks stop together: a stop asked on any rank (rank 0's user)
            # travels with the statistics (one collective per token)
            stats, flags = gather_stats(cache, group, (int(should_stop is not None and should_stop()),))
            if any(f[0] for f in flags):
                finish = "cancelled"
                break
            yield GenerationEvent(text, last, len(tokens), n, prefill_tps, decode_tps, stats)
            last, text = (), ""
    finally:
        steps.close()
    if finish != "stop":
        detok.finalize()
        more, stopped = matcher.feed(detok.last_segment)
        text += more if stopped else more + matcher.flush()
        finish = "stop" if stopped else finish or "length"
    yield GenerationEvent(text, last, len(tokens), n, prefill_tps, decode_tps,
                          gather_stats(cache, group)[0], finish)


def prefill(model, tokens: Sequence[int], cache: list, *, prefill_step: int = DEFAULT_PREFILL_STEP,
            progress: Callable[[int, int], None] | None = None) -> None:
    """Feed ``tokens`` into ``cache`` in chunks without generating (``progress(done, total)``
    after each chunk)."""
    tokens = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens))
    total = tokens.size
    for start in range(0, total, prefill_step):
        model(tokens[start:start + prefill_step][None], cache=cache)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(min(start + prefill_step, total), total)


def generate(model, tokenizer, prompt: Prompt, *, max_tokens: int = 256,
             cache: list | None = None, **kwargs) -> str:
    """Generate and return the whole reply text (see ``stream_generate`` for the options)."""
    return "".join(e.text for e in stream_generate(model, tokenizer, prompt,
                                                   max_tokens=max_tokens, cache=cache, **kwargs))
