"""The server's conversations and their caches, all inside one memory budget.

A request is matched to the session whose cache it extends (the longest common token
prefix with what that cache holds, see ``Entry.reuse``), or to the session the client names
(``session_id``); otherwise a new session starts. Before a turn runs, room is made for the
most its cache can grow to (``reserve_bytes``): least-recently-used sessions are saved to
disk, compressed (``ChatSession.save``: atomic), and dropped from memory, so the caches in
memory never add up to more than ``total``. A session on disk is loaded back when a request
extends it: its history is not read through the model again (unless a file of it fails its
checksum: then it is, see ``load``).

The files, the directory and (with ``--kv-dir``, sessions kept across restarts) its index
are the disk tier's (``disk.DiskTier``); with ``--kv-dir`` ``close`` saves the sessions in
memory there too.

All of this runs on the worker thread; ``view`` (``GET /v1/kv``) may be called from any.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx_lm.utils import common_prefix_len

from ..budget import format_bytes
from ..cache.config import CacheConfig
from ..cache.plan import plan
from ..cache.shape import shape_of
from ..chat import ChatSession
from ..errors import InputError, MlxkvError
from ..generation import DEFAULT_PREFILL_STEP, chat_tokens, encode_prompt
from ..stats import CacheStats, gather_stats
from .disk import DiskTier
from .protocol import APIError, Request, bad, usage


@dataclass
class Entry:
    """One conversation: its session while in memory, what its cache holds either way."""

    id: str
    config: CacheConfig                 # resolved for the model
    path: Path                          # where it is saved while on disk
    session: ChatSession | None = None  # None: on disk
    tokens: list[int] = field(default_factory=list)  # token ids the cache holds
    reply_start: int = 0                # where the last reply begins in ``tokens``
    trimmable: bool = True              # the cache can be cut back (full, quantized)
    stats: CacheStats = field(default_factory=CacheStats)
    disk_bytes: int = 0
    sums: dict[str, str] = field(default_factory=dict)  # on disk: {file name: sha256}
    saved_at: float = 0.0               # on disk: when it was saved (time.time())
    saved_counts: tuple[int, int, int] = (0, 0, 0)  # seen, kept, evicted (read from an index)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        """Bytes of its cache in memory (0 on disk)."""
        return self.stats.nbytes if self.session is not None else 0

    def counts(self) -> tuple[int, int, int]:
        """Tokens its cache has seen, kept, evicted."""
        if not self.stats.layers:  # not in memory since this store started
            return self.saved_counts
        return self.stats.seen, self.stats.kept, self.stats.evicted

    def reuse(self, prompt: list[int]) -> int:
        """How many cached tokens ``prompt`` can reuse: > 0 only when it continues this
        conversation (everything up to the last reply is its prefix). A bounded cache
        cannot be cut back, so for it a prompt must also be longer than what it holds."""
        n = common_prefix_len(self.tokens, prompt)
        if n == 0 or n < self.reply_start:
            return 0
        return n if self.trimmable or len(prompt) > len(self.tokens) else 0

    def take(self, session: ChatSession) -> None:
        """Record what ``session``'s cache now holds."""
        self.tokens = list(session.cached_tokens)
        self.reply_start = session.last_reply_start
        self.stats = gather_stats(session.cache, shape_of(session.model).group)[0]


class SessionStore:
    """Sessions of one model within ``total`` bytes of KV cache in memory; saved sessions
    go to ``directory`` through the disk tier (kept across restarts, see
    ``disk.DiskTier``; by default a temporary one, removed by ``close``)."""

    def __init__(self, model, tokenizer, *, config: CacheConfig, total: int,
                 directory: Path | None = None, disk_total: int | None = None,
                 generation: dict | None = None, log: Callable[[str], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.shape = shape_of(model)
        self.config = config.resolve(self.shape.head_dim)
        self.total = total
        self.context = self.shape.context
        self.group = self.shape.group
        self.generation = dict(generation or {})
        self.log = log or (lambda text: print(f"mlxkv serve: {text}", file=sys.stderr, flush=True))
        self.disk = DiskTier(directory, model, tokenizer, self.config.to_dict(), disk_total,
                             self.generation, self.log)
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        # sessions saved to disk, loaded back (from their cache), loaded by reading their
        # history again (a file failed its checksum), removed over disk_total, and found
        # in the directory's index at start
        self.spilled = self.restored = self.rebuilt = self.forgotten = self.resumed = 0
        try:
            self.check(self.config)
            if self.disk.persistent:
                self._resume()
        except BaseException:
            self.disk.close()
            raise

    def _resume(self) -> None:
        """Register the sessions the directory's index names as on disk (``--kv-dir``)."""
        saved = self.disk.open()
        if saved is None:  # its index could not be read
            return
        self.entries.update((fields["id"], Entry(**fields)) for fields in saved)
        self.resumed = len(self.entries)
        if self.entries:
            self.log(f"{len(self.entries)} conversation(s) saved in {self.disk.directory} "
                     "continue from there")
        self._cap_disk()
        self._write_index()

    def _write_index(self) -> None:
        self.disk.write_index([e for e in list(self.entries.values())
                               if e.session is None and e.sums])

    # ----- memory ----------------------------------------------------------------------
    def reserve_bytes(self, config: CacheConfig, tokens: int) -> int:
        """The most a cache of ``config`` takes holding ``tokens`` tokens (its plan's
        bound, prompts fed in this server's chunks)."""
        chunk = self.generation.get("prefill_step", DEFAULT_PREFILL_STEP)
        return plan(config, self.shape).bound_bytes(tokens, chunk)

    def check(self, config: CacheConfig) -> None:
        """A session of ``config`` fits in ``total`` with room for at least a prompt."""
        need = self.reserve_bytes(config, 1)
        if need > self.total:
            raise InputError(f"--kv-total {format_bytes(self.total)} cannot hold even one session "
                             f"of this cache ({config.describe()}: {format_bytes(need)}): raise "
                             "it or give a smaller --kv-budget")

    def in_memory_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def make_room(self, entry: Entry, need: int) -> None:
        """Save least-recently-used sessions other than ``entry`` to disk until ``need``
        bytes for ``entry`` fit inside ``total`` beside the rest."""
        need = max(need, entry.nbytes)
        if need > self.total:
            raise bad(f"this request may need {format_bytes(need)} of KV cache, more than the "
                      f"server's --kv-total of {format_bytes(self.total)}: send kv_budget "
                      "(e.g. \"64MB\") or a smaller max_tokens", code="kv_total_exceeded")
        while self.in_memory_bytes() - entry.nbytes + need > self.total:
            victims = [e for e in self.entries.values() if e.session is not None and e is not entry]
            self.spill(min(victims, key=lambda e: e.last_used), keep=entry)

    def spill(self, entry: Entry, keep: Entry | None = None) -> None:
        """Save ``entry``'s session to disk (compressed cache + messages) and drop it from
        memory; over ``disk_total``, forget the oldest saved sessions (except ``keep``)."""
        entry.sums, entry.disk_bytes = self.disk.save(entry.session, entry.path)
        entry.saved_at = time.time()
        with self._lock:
            entry.session = None
        mx.clear_cache()
        self.spilled += 1
        self._write_index()
        self._cap_disk(keep)

    def _cap_disk(self, keep: Entry | None = None) -> None:
        """Over ``disk_total``, forget the oldest saved sessions (except ``keep``)."""
        saved = [e for e in self.entries.values() if e.session is None and e is not keep]
        for oldest in self.disk.over_limit(saved):
            self.drop(oldest)  # its next request reads its history again
            self.forgotten += 1
            self.log(f"session {oldest.id}: removed from disk (over --kv-disk "
                     f"{format_bytes(self.disk.limit)})")

    def load(self, entry: Entry) -> None:
        """Bring a saved session back into memory (``DiskTier.load``: a file that is
        missing or fails its checksum is never loaded); its files are removed: the session
        changes from here on."""
        session, rebuilt = self.disk.load(entry)
        with self._lock:
            entry.session, entry.disk_bytes, entry.sums = session, 0, {}
        self._write_index()  # the index lets go of the files before they are removed
        self.disk.remove(entry.path)
        entry.take(session)
        if rebuilt:
            self.rebuilt += 1  # its history is read through the model again
        else:
            self.restored += 1

    # ----- requests --------------------------------------------------------------------
    def _new(self, session_id: str | None, config: CacheConfig) -> Entry:
        sid = session_id or uuid.uuid4().hex[:16]
        self.check(config)
        session = ChatSession(self.model, self.tokenizer, cache_config=config, **self.generation)
        entry = Entry(id=sid, config=config, path=self.disk.path(sid), session=session,
                      trimmable=all(c.is_trimmable() for c in session.cache))
        with self._lock:
            self.entries[sid] = entry
        return entry

    def drop(self, entry: Entry) -> None:
        with self._lock:
            self.entries.pop(entry.id, None)
        if entry.sums:
            self._write_index()
        self.disk.remove(entry.path)

    def session_for(self, req: Request, prompt: list[int]) -> Entry:
        """The session ``req`` continues (named, or found by prefix), or a new one."""
        config = req.config.resolve(self.shape.head_dim)
        if req.session_id is not None:
            entry = self.entries.get(req.session_id)
            if entry is not None and entry.config != config:
                self.drop(entry)  # other cache settings: a new cache
                entry = None
            return entry or self._new(req.session_id, config)
        best, found = 0, None
        for entry in self.entries.values():
            n = entry.reuse(prompt) if entry.config == config else 0
            if n > best:
                best, found = n, entry
        return found or self._new(None, config)

    def prompt(self, req: Request) -> list[int]:
        if req.kind == "chat":
            return chat_tokens(self.tokenizer, req.messages)
        return encode_prompt(self.tokenizer, req.prompt)

    def serve(self, req: Request, emit: Callable[[dict], None],
              cancelled: Callable[[], bool]) -> None:
        """Run ``req``, calling ``emit`` with {"type": "delta", "text", "finish"} per token
        and {"type": "done", "usage", "session"} at the end (errors are raised)."""
        prompt = self.prompt(req)
        bounded = req.config.kind in ("window", "budget")
        if not bounded and self.context is not None and len(prompt) >= self.context:
            raise bad(f"the prompt is {len(prompt)} tokens, more than the model's context of "
                      f"{self.context} tokens (send kv_budget or kv_window to go past it)",
                      "messages" if req.kind == "chat" else "prompt", "context_length_exceeded")
        vocab = getattr(self.model.args, "vocab_size", None)
        if vocab is not None and max(prompt) >= vocab:
            raise bad(f"the prompt holds token ids outside the vocabulary of {vocab}", "prompt")
        entry = self.session_for(req, prompt)
        try:
            self.make_room(entry, self.reserve_bytes(entry.config, len(prompt) + req.max_tokens))
        except APIError:
            if not entry.tokens and entry.session is not None:
                self.drop(entry)  # made for this request: nothing to keep
            raise
        if entry.session is None:
            self.load(entry)
        entry.last_used = time.monotonic()
        session = entry.session
        options = dict(max_tokens=req.max_tokens, sampling=req.sampling, stop=req.stop,
                       should_stop=cancelled)
        turn = (session.respond(req.messages, **options) if req.kind == "chat"
                else session.complete(prompt, **options))
        generated = 0
        try:
            for event in turn:
                entry.stats = event.cache
                generated = event.generated_tokens
                emit({"type": "delta", "text": event.text, "finish": event.finish_reason,
                      "session": entry.id})
                if self.in_memory_bytes() > self.total:  # never expected: the reserve bounds it
                    self.make_room(entry, entry.nbytes)
        finally:
            entry.take(session)
            entry.last_used = time.monotonic()
        emit({"type": "done", "session": entry.id,
              "usage": usage(len(prompt), generated, len(prompt) - session.last_fed)})

    # ----- views -----------------------------------------------------------------------
    def view(self) -> dict:
        """The whole cache against the budget, and each session (``GET /v1/kv``)."""
        with self._lock:
            entries = list(self.entries.values())
            rows = [{"id": e.id, "where": "memory" if e.session is not None else "disk",
                     **dict(zip(("tokens_seen", "tokens_kept", "tokens_evicted"), e.counts())),
                     "bytes": e.nbytes,
                     "disk_bytes": e.disk_bytes, "cache": plan(e.config, self.shape).describe(),
                     "ranks": [{"rank": r.rank, "bytes": r.nbytes if e.session is not None else 0}
                               for r in e.stats.ranks]}
                    for e in sorted(entries, key=lambda e: -e.last_used)]
        total = sum(r["bytes"] for r in rows)
        per_rank = [sum(row["ranks"][r]["bytes"] for row in rows if row["ranks"])
                    for r in range(self.group.size)] if self.group.size > 1 else []
        return {"object": "kv", "total_bytes": total, "limit_bytes": self.total,
                "group_size": self.group.size, "rank_bytes": per_rank,
                "sessions_in_memory": sum(r["where"] == "memory" for r in rows),
                "sessions_on_disk": sum(r["where"] == "disk" for r in rows),
                "disk_bytes": sum(r["disk_bytes"] for r in rows),
                "disk_limit_bytes": self.disk.limit, "saved_to_disk": self.spilled,
                "restored_from_disk": self.restored, "removed_from_disk": self.forgotten,
                "rebuilt_from_history": self.rebuilt, "kept_across_restarts": self.disk.persistent,
                "resumed_at_start": self.resumed,
                "default_cache": plan(self.config, self.shape).describe(), "sessions": rows}

    def close(self, save: bool = True) -> None:
        """With a directory of its own (``--kv-dir``): save the sessions in memory there
        (``save``: nothing else uses them any more), least recently used first, for the
        next store on it. Otherwise remove the temporary directory."""
        if save and self.disk.persistent:
            held = [e for e in self.entries.values() if e.session is not None and e.tokens]
            for e in sorted(held, key=lambda e: e.last_used):
                try:
                    self.spill(e)
                except (OSError, MlxkvError) as err:
                    self.log(f"session {e.id}: not saved ({err})")
        with self._lock:
            self.entries.clear()
        self.disk.close()
