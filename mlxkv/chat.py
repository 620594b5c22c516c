"""Multi-turn chat that reuses the KV cache across turns (the history is never re-prefilled)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterator

from mlx_lm.utils import common_prefix_len

from .cache.shape import shape_of
from .distributed import SINGLE, Group
from .cache.config import CacheConfig
from .cache.make import make_cache
from .errors import CacheFileError, InputError, MlxkvError
from .generation import (DEFAULT_PREFILL_STEP, GenerationEvent, chat_text, encode_prompt,
                         prefill, stream_generate)


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
        # resolved for this model (e.g. the group size), so describe() shows what is used
        self.cache_config = (cache_config or CacheConfig()).resolve(shape_of(model).head_dim)
        self.system = system
        self.generation = generation
        self.messages: list[dict[str, str]] = []
        self.resume_note: str | None = None  # set by resume() when the cache was rebuilt
        self.reset()

    def reset(self, keep_messages: bool = False) -> None:
        self.cache = make_cache(self.model, self.cache_config)
        self.cached_tokens: list[int] = []
        self.last_reply_start = 0  # where the last reply's tokens begin in cached_tokens
        self.last_fed = 0           # tokens the last turn fed to the model
        if not keep_messages:
            self.messages = []

    def _render_text(self, messages, generation_prompt: bool = True) -> str:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return chat_text(self.tokenizer, full, generation_prompt=generation_prompt)

    def _render(self, messages, generation_prompt: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, self._render_text(messages, generation_prompt))

    def _suffix(self, prompt: list[int], messages) -> list[int]:
        """The tokens to feed for ``prompt`` (the conversation ``messages`` rendered).

        Usually the cache holds a prefix of it and the rest is fed. Where they diverge
        (the reply re-tokenizes differently, or the history was edited), a trimmable
        cache is trimmed back; a bounded cache (window, budget) cannot be, so when only
        the last reply differs, what the template puts after that reply is fed on top
        of the tokens the model generated; otherwise the cache is rebuilt."""
        n = common_prefix_len(self.cached_tokens, prompt)
        n = min(n, len(prompt) - 1)  # always feed at least one token
        extra = len(self.cached_tokens) - n
        if not extra:
            return prompt[n:]
        if all(c.is_trimmable() for c in self.cache):
            for c in self.cache:
                c.trim(extra)
            self.cached_tokens = self.cached_tokens[:n]
            return prompt[n:]
        tail = self._after_last_reply(messages)
        if tail is not None and n >= self.last_reply_start:
            return tail
        self.reset(keep_messages=True)
        return prompt

    def _after_last_reply(self, messages) -> list[int] | None:
        """Tokens the template renders after the last assistant message (None if the
        conversation does not end with the reply this cache generated)."""
        if len(messages) < 2 or messages[-2]["role"] != "assistant":
            return None
        text = self._render_text(messages)
        reply = messages[-2]["content"]
        at = text.rfind(reply, 0, len(text) - len(messages[-1]["content"]))
        if not reply or at < 0:
            return None
        tail = text[at + len(reply):]
        return list(self.tokenizer.encode(tail, add_special_tokens=False))

    def send(self, text: str, **overrides) -> Iterator[GenerationEvent]:
        """Add a user message and stream the reply; the reply (even a partial one, if
        the stream is stopped) is added to the history."""
        if not text.strip():
            raise InputError("the message is empty")
        yield from self.respond(self.messages + [{"role": "user", "content": text}], **overrides)

    def respond(self, messages: list[dict[str, str]], **overrides) -> Iterator[GenerationEvent]:
        """Stream the reply to the conversation ``messages`` (the whole history, as an
        OpenAI-style client sends it): the cache is reused as far as it holds the
        conversation, the messages and the reply become the history."""
        if not messages:
            raise InputError("the conversation has no messages")
        yield from self._turn(self._render(messages), messages, overrides)

    def complete(self, prompt: list[int], **overrides) -> Iterator[GenerationEvent]:
        """Stream a continuation of the token ids ``prompt`` (a plain completion, no chat
        template), reusing the cache as far as it holds them."""
        if not prompt:
            raise InputError("the prompt is empty")
        yield from self._turn(list(prompt), None, overrides)

    def _turn(self, prompt: list[int], messages, overrides) -> Iterator[GenerationEvent]:
        feed = self._suffix(prompt, messages)
        self.last_fed = len(feed)
        held = self.cached_tokens
        start_offset = self.cache[0].offset
        reply, generated = [], []
        options = {**self.generation, **overrides}
        failed = False
        try:
            for event in stream_generate(self.model, self.tokenizer, feed, cache=self.cache,
                                         **options):
                reply.append(event.text)
                generated.extend(event.tokens)
                yield event
        except InputError:
            failed = True
            raise
        finally:
            if not failed:
                if messages is not None:
                    self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]
                fed = self.cache[0].offset - start_offset
                self.last_reply_start = len(held) + len(feed)
                self.cached_tokens = (held + feed + generated)[: len(held) + fed]

    def reconfigure(self, config: CacheConfig,
                    progress: Callable[[int, int], None] | None = None) -> None:
        """Switch to another cache config, rebuilding the cache from the conversation
        (``progress(done, total)`` is called during the prefill). If the new config is
        invalid the session is left as it was."""
        config = config.resolve(shape_of(self.model).head_dim)  # raises before anything changes
        cache = make_cache(self.model, config)
        tokens = self._render(self.messages, generation_prompt=False) if self.messages else []
        self.cache_config, self.cache, self.cached_tokens = config, cache, []
        if not tokens:
            return
        step = self.generation.get("prefill_step", DEFAULT_PREFILL_STEP)
        prefill(self.model, tokens, self.cache, prefill_step=step, progress=progress)
        self.cached_tokens = tokens
        self.last_reply_start = len(self.cached_tokens)

    def ask(self, text: str, **overrides) -> str:
        return "".join(e.text for e in self.send(text, **overrides))

    # ----- saved conversations -----------------------------------------------------------
    def save(self, path, *, model_name: str | None = None) -> Path:
        """Save the conversation: ``path`` is one JSON document (format ``mlxkv-chat-1``:
        messages, system message, cache config, model), its compressed cache goes beside
        it (``kv_path(path)``, see ``mlxkv.persist``). Each is written atomically, the
        document first; the cache records a digest of the messages it belongs to."""
        from .persist import atomic_write, save_cache

        path = Path(path)
        doc = {"format": CHAT_FORMAT,
               "model": model_name or shape_of(self.model).name,
               "system": self.system, "cache_config": self.cache_config.to_dict(),
               "messages": self.messages, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        text = json.dumps(doc, indent=1, ensure_ascii=False)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        save_cache(kv_path(path, shape_of(self.model).group), self.cache, model=self.model,
                   config=self.cache_config,
                   tokens=self.cached_tokens,
                   extra={"conversation": _digest(self.messages),
                          "reply_start": self.last_reply_start})
        return path

    @staticmethod
    def read(path) -> dict:
        """The saved conversation document at ``path``, checked (``CacheFileError`` if it
        is not one)."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            messages = doc["messages"]
            ok = doc.get("format") == CHAT_FORMAT and all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str) for m in messages)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheFileError(f"the saved chat {Path(path).name} cannot be read: {e}") from None
        if not ok:
            raise CacheFileError(f"{Path(path).name} is not an mlxkv chat file")
        return doc

    @classmethod
    def resume(cls, path, model, tokenizer, *, progress: Callable[[int, int], None] | None = None,
               **generation) -> "ChatSession":
        """A session from ``save``. From its saved cache the next turn feeds only its own
        tokens; when that cache cannot be used (missing, made by another model, older
        than the conversation) it is rebuilt from the messages, and ``resume_note`` says
        why. A single ``.safetensors`` file saved by mlxkv 0.1 loads too."""
        from .persist import load_cache

        def from_cache(loaded, messages, system):
            cache, config, tokens, _ = loaded
            session = cls(model, tokenizer, cache_config=config, system=system, **generation)
            session.cache, session.cached_tokens, session.messages = cache, tokens, messages
            # where the last reply begins (files before 0.2: after the last token)
            session.last_reply_start = int(loaded[3].get("reply_start", len(tokens)))
            return session

        path = Path(path)
        if path.suffix == ".safetensors":  # 0.1: the conversation in the cache's metadata
            loaded = load_cache(path, model)
            extra = loaded[3]
            return from_cache(loaded, list(extra.get("messages", [])), extra.get("system"))
        doc = cls.read(path)
        messages = list(doc["messages"])
        try:
            loaded = load_cache(_saved_kv(path, shape_of(model).group), model)
            if loaded[3].get("conversation") == _digest(messages):
                return from_cache(loaded, messages, doc.get("system"))
            why = "the saved cache is older than the conversation"
        except CacheFileError as e:
            why = str(e)
        try:
            config = CacheConfig(**doc.get("cache_config", {}))
        except (TypeError, MlxkvError):
            config = CacheConfig()
        session = cls(model, tokenizer, cache_config=config, system=doc.get("system"), **generation)
        session.messages = messages
        session.reconfigure(config, progress=progress)
        session.resume_note = f"rebuilt the cache from the messages ({why})"
        return session


CHAT_FORMAT = "mlxkv-chat-1"


def kv_path(path, group: Group = SINGLE) -> Path:
    """Where a saved conversation's compressed cache lives: ``chat.json`` ->
    ``chat.kv.safetensors``; in a group of processes each saves its own part,
    ``chat.kv.rank1-of-3.safetensors``."""
    if group.size == 1:
        return Path(path).with_suffix(".kv.safetensors")
    return Path(path).with_suffix(f".kv.rank{group.rank}-of-{group.size}.safetensors")


def _saved_kv(path, group: Group) -> Path:
    """This process's saved cache of the conversation at ``path``; a ``CacheFileError``
    that says so when only a group of another size saved one."""
    kv = kv_path(path, group)
    if not kv.exists():
        sizes = sorted({int(p.name.rsplit("-of-", 1)[1].split(".")[0]) if "-of-" in p.name else 1
                        for p in Path(path).parent.glob(Path(path).stem + ".kv.*safetensors")})
        if sizes:
            where = "one process" if group.size == 1 else f"a group of {group.size}"
            raise CacheFileError(f"its cache was saved by {' and '.join(map(_group_words, sizes))}, "
                                 f"and this is {where} (mlx.launch -n {sizes[-1]} uses it)")
    return kv


def _group_words(size: int) -> str:
    return "one process" if size == 1 else f"a group of {size} processes"


def _digest(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
