"""Multi-turn chat that reuses the KV cache across turns (the history is never re-prefilled)."""

from __future__ import annotations

from typing import Iterator

from mlx_lm.utils import common_prefix_len

from .cache.config import CacheConfig, make_cache
from .errors import InputError
from .generation import GenerationEvent, stream_generate


class ChatSession:
    """A conversation with a model: messages, and the cache holding their tokens.

    Each turn renders the whole conversation with the model's chat template, finds how
    much of it the cache already holds, and feeds only the rest. A failed turn (bad
    input, context overflow) leaves the history as it was.
    """

    def __init__(self, model, tokenizer, *, cache_config: CacheConfig | None = None,
                 system: str | None = None, **generation):
        self.model = model
        self.tokenizer = tokenizer
        self.cache_config = cache_config or CacheConfig()
        self.system = system
        self.generation = generation
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self, keep_messages: bool = False) -> None:
        self.cache = make_cache(self.model, self.cache_config)
        self.cached_tokens: list[int] = []
        if not keep_messages:
            self.messages = []

    def _render(self, messages) -> list[int]:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        if not self.tokenizer.has_chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in full) + "assistant: "
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.apply_chat_template(full, add_generation_prompt=True))

    def _suffix(self, prompt: list[int]) -> list[int]:
        """The tokens to feed; trims (or rebuilds) the cache where it diverges from ``prompt``."""
        n = common_prefix_len(self.cached_tokens, prompt)
        n = min(n, len(prompt) - 1)  # always feed at least one token
        extra = len(self.cached_tokens) - n
        if extra:
            trimmed = [c.trim(extra) if c.is_trimmable() else 0 for c in self.cache]
            if any(t != extra for t in trimmed):
                self.reset(keep_messages=True)
                n = 0
            else:
                self.cached_tokens = self.cached_tokens[:n]
        return prompt[n:]

    def send(self, text: str, **overrides) -> Iterator[GenerationEvent]:
        """Add a user message and stream the reply; the reply (even a partial one, if
        the stream is stopped) is added to the history."""
        if not text.strip():
            raise InputError("the message is empty")
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self._render(messages)
        feed = self._suffix(prompt)
        held = self.cached_tokens
        start_offset = self.cache[0].offset
        reply, generated = [], []
        options = {**self.generation, **overrides}
        self.messages = messages
        try:
            for event in stream_generate(self.model, self.tokenizer, feed, cache=self.cache,
                                         **options):
                reply.append(event.text)
                generated.extend(event.tokens)
                yield event
        except InputError:
            self.messages = messages[:-1]
            raise
        finally:
            if self.messages is messages:
                self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]
                fed = self.cache[0].offset - start_offset
                self.cached_tokens = (held + feed + generated)[: len(held) + fed]

    def ask(self, text: str, **overrides) -> str:
        return "".join(e.text for e in self.send(text, **overrides))

    def save(self, path) -> None:
        """Save the conversation with its compressed cache (see ``mlxkv.persist``)."""
        from .persist import save_cache

        save_cache(path, self.cache, model=self.model, config=self.cache_config,
                   tokens=self.cached_tokens,
                   extra={"messages": self.messages, "system": self.system})

    @classmethod
    def resume(cls, path, model, tokenizer, **generation) -> "ChatSession":
        """A session from ``save``: the next turn feeds only its own tokens."""
        from .persist import load_cache

        cache, config, tokens, extra = load_cache(path, model)
        session = cls(model, tokenizer, cache_config=config, system=extra.get("system"),
                      **generation)
        session.cache, session.cached_tokens = cache, tokens
        session.messages = list(extra.get("messages", []))
        return session
