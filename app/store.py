"""Saved conversations: ``<name>.json`` (the messages, always readable) beside
``<name>.kv.safetensors`` (the compressed cache, so a chat resumes without re-prefill)
under the user data dir."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

from mlxkv import CacheConfig, ChatSession
from mlxkv.errors import CacheFileError, InputError
from mlxkv.paths import data_dir
from mlxkv.persist import atomic_write

FORMAT = "mlxkv-chat-1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_name() -> str:
    return time.strftime("chat-%Y%m%d-%H%M%S")


class ChatStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else data_dir() / "chats"

    @staticmethod
    def check_name(name: str) -> str:
        if not _NAME.fullmatch(name) or name.endswith(".kv"):
            raise InputError(f"{name!r} is not a usable chat name: use letters, digits, '.', "
                             "'-' and '_' (up to 64, starting with a letter or digit)")
        return name

    def paths(self, name: str) -> tuple[Path, Path]:
        self.check_name(name)
        return self.root / f"{name}.json", self.root / f"{name}.kv.safetensors"

    def names(self) -> list[str]:
        """Saved conversations, most recent first."""
        if not self.root.is_dir():
            return []
        files = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.stem for p in files]

    def save(self, name: str, session: ChatSession, *, model_name: str) -> Path:
        """Write the conversation, then its cache (each atomically)."""
        doc_path, kv_path = self.paths(name)
        doc = {"format": FORMAT, "model": model_name, "system": session.system,
               "cache_config": session.cache_config.to_dict(), "messages": session.messages,
               "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        text = json.dumps(doc, indent=1, ensure_ascii=False)
        atomic_write(doc_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        session.save(kv_path)
        return doc_path

    def read(self, name: str) -> dict:
        doc_path, _ = self.paths(name)
        if not doc_path.exists():
            known = ", ".join(self.names()[:10]) or "none yet"
            raise InputError(f"no saved chat named {name!r} (saved: {known})")
        try:
            doc = json.loads(doc_path.read_text(encoding="utf-8"))
            messages = doc["messages"]
            ok = doc.get("format") == FORMAT and all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str) for m in messages)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheFileError(f"the saved chat {name!r} cannot be read: {e}") from None
        if not ok:
            raise CacheFileError(f"the saved chat {name!r} is not an mlxkv chat file")
        return doc

    def load(self, name: str, model, tokenizer, *,
             progress: Callable[[int, int], None] | None = None,
             **generation) -> tuple[ChatSession, str | None]:
        """(session, note): resumes from the saved cache, or rebuilds the cache from the
        messages when that cache cannot be used (the note says why)."""
        doc = self.read(name)
        _, kv_path = self.paths(name)
        try:
            session = ChatSession.resume(kv_path, model, tokenizer, **generation)
            if session.messages == doc["messages"]:
                return session, None
            why = "the saved cache is older than the conversation"
        except CacheFileError as e:
            why = str(e)
        try:
            config = CacheConfig(**doc.get("cache_config", {}))
        except TypeError:
            config = CacheConfig()
        session = ChatSession(model, tokenizer, cache_config=config,
                              system=doc.get("system"), **generation)
        session.messages = list(doc["messages"])
        session.reconfigure(config, progress=progress)
        return session, f"rebuilt the cache from the messages ({why})"
