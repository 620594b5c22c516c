"""Saved conversations under the user data dir, by name: ``<name>.json`` (the conversation
in mlxkv's one chat format, always readable) beside ``<name>.kv.safetensors`` (the
compressed cache, so a chat resumes without re-prefill); see ``ChatSession.save``."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

from mlxkv import ChatSession
from mlxkv.chat import kv_path
from mlxkv.errors import CacheFileError, InputError
from mlxkv.paths import data_dir

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
        doc = self.root / f"{name}.json"
        return doc, kv_path(doc)

    def names(self) -> list[str]:
        """Saved conversations, most recent first."""
        if not self.root.is_dir():
            return []
        files = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.stem for p in files]

    def save(self, name: str, session: ChatSession, *, model_name: str) -> Path:
        """Write the conversation and its cache (``ChatSession.save``)."""
        doc_path, _ = self.paths(name)
        doc_path.parent.mkdir(parents=True, exist_ok=True)
        return session.save(doc_path, model_name=model_name)

    def existing(self, name: str) -> Path:
        """The document of the saved chat ``name`` (``InputError`` naming the saved ones
        when there is none)."""
        doc_path, _ = self.paths(name)
        if not doc_path.exists():
            known = ", ".join(self.names()[:10]) or "none yet"
            raise InputError(f"no saved chat named {name!r} (saved: {known})")
        return doc_path

    def read(self, name: str) -> dict:
        doc_path = self.existing(name)
        try:
            return ChatSession.read(doc_path)
        except CacheFileError as e:
            raise CacheFileError(f"the saved chat {name!r} cannot be read ({e})") from None

    def load(self, name: str, model, tokenizer, *,
             progress: Callable[[int, int], None] | None = None,
             **generation) -> tuple[ChatSession, str | None]:
        """(session, note): resumes from the saved cache, or rebuilds the cache from the
        messages when that cache cannot be used (the note says why)."""
        session = ChatSession.resume(self.existing(name), model, tokenizer, progress=progress,
                                     **generation)
        return session, session.resume_note
