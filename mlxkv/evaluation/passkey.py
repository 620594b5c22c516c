"""Passkey retrieval: a number hidden at a depth of a filler text, asked for at the end
in the model's chat template, fed in one chunk (so a prompt-time policy such as SnapKV
sees the question)."""

from __future__ import annotations

import random
from typing import Callable

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is a pass key hidden in this long text. Find it and remember it.\n\n"
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Chat-template tokens of about ``length`` tokens with ``key`` at ``depth`` (0..1)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = len(tokenizer.encode(FILLER, add_special_tokens=False))
    fixed = len(_render(tokenizer, INTRO + needle + QUESTION))
    n = max(1, (length - fixed) // per_filler)
    at = round(n * depth)
    body = FILLER * at + needle + FILLER * (n - at)
    return _render(tokenizer, INTRO + body + QUESTION)


def _render(tokenizer, content: str) -> list[int]:
    from ..generation import chat_text, encode_prompt

    text = chat_text(tokenizer, [{"role": "user", "content": content}])
    return encode_prompt(tokenizer, text + ANSWER_PREFIX)


def passkey(model, tokenizer, factories: dict[str, Callable[[], list]], *, lengths, depths,
            trials: int = 1, seed: int = 0,
            step: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Accuracy per config and "length@depth" cell over ``trials`` seeded keys; ``step()``
    after each generation."""
    from ..generation import generate

    rng = random.Random(seed)
    cells = [(L, d, rng.randrange(10000, 99999)) for L in lengths for d in depths
             for _ in range(trials)]
    out: dict[str, dict[str, float]] = {n: {} for n in factories}
    for L, d, key in cells:
        prompt = passkey_prompt(tokenizer, L, d, key)
        for name, make in factories.items():
            # One chunk: prompt-time policies (SnapKV) see the question, as kvpress does;
            # mlxkv's caches process it in blocks of queries, so memory stays bounded.
            reply = generate(model, tokenizer, prompt, max_tokens=8, cache=make(),
                             prefill_step=len(prompt))
            cell = f"{L}@{int(round(100 * d))}"
            out[name][cell] = out[name].get(cell, 0.0) + (str(key) in reply) / trials
            if step is not None:
                step()
    return out
