"""The server's conversations on disk: ``--kv-dir`` and its index.

Each saved conversation is the two files ``ChatSession.save`` writes (its messages and its
compressed cache), named by a digest of its id. With ``--kv-dir`` the directory also
holds ``index.json``: the model's identity, the server's default cache settings, and per
conversation its id, cache settings, token count and each file's sha256. A restarted
server reads it and continues those conversations from their saved caches.

Crash safety (``kill -9`` at any moment): every file is written to a temporary name,
synced and renamed over its place (``persist.atomic_write``); a conversation's files are
written before the index names them, and the index drops a conversation before its files
are removed. A file whose checksum does not match is never loaded; files of ours that
the index does not name (left by a save a crash interrupted) are removed at start.

``DiskTier`` is all of this for one ``SessionStore``: it saves, verifies and removes a
conversation's files and keeps the index; the store decides what stays in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..cache.config import CacheConfig
from ..cache.shape import shape_of
from ..chat import ChatSession, kv_path
from ..errors import InputError, MlxkvError
from ..persist import atomic_write, load_cache
from .protocol import SESSION_ID

if TYPE_CHECKING:
    from .sessions import Entry

INDEX = "index.json"
INDEX_FORMAT = "mlxkv-serve-index-1"
LOCK = "index.lock"  # held by the server using the directory
# our files: <32 hex>.json, <32 hex>.kv[.rankR-of-N].safetensors, and atomic_write's
# temporary names for them and for the index (".<name>.<random><suffix>"), check_dir's probe
_OURS = re.compile(r"[0-9a-f]{32}\.(json|kv\.safetensors|kv\.rank\d+-of-\d+\.safetensors)")
_TEMP = re.compile(r"\.([0-9a-f]{32}\.|index\.json\.|mlxkv-probe-).+")


def file_stem(session_id: str) -> str:
    """A conversation's file name (without suffix): a digest of its id, never the
    client's text."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


def check_dir(path) -> Path:
    """``path`` as a directory this process can write files in (made if missing); an
    ``InputError`` that says why not."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"--kv-dir {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".mlxkv-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"--kv-dir {path} is not a writable directory "
                         f"({e.strerror or e})") from None
    return path


def lock_dir(path: Path) -> int:
    """Hold ``path`` for this process (an open file descriptor; closing it lets go, as
    the process's end does); an ``InputError`` when another server holds it."""
    import fcntl

    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InputError(f"--kv-dir {path} is in use by another mlxkv serve: give each "
                         "server its own") from None
    return fd


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def saved_tokens(kv_file: Path) -> tuple[list[int], int] | None:
    """(token ids, where the last reply begins) a saved cache records, read from its
    file's header alone (the arrays are not read); None if it cannot be read."""
    try:
        with open(kv_file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 28:
                return None
            meta = json.loads(f.read(size)).get("__metadata__", {})
        tokens = [int(t) for t in json.loads(meta["tokens"])]
        extra = json.loads(meta.get("extra", "{}"))
        return tokens, int(extra.get("reply_start", len(tokens)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def sync(*paths: Path) -> None:
    """Flush files (or directories: their entries, i.e. renames) to the device."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DiskTier:
    """Where a store's saved conversations go: ``directory`` (``--kv-dir``: held with a
    lock, an index naming what is saved there, files synced before the index names them;
    for this process's rank in a group, a folder of its own) or, without one, a temporary
    directory that ``close`` removes. Over ``limit`` bytes the oldest are forgotten."""

    def __init__(self, directory: Path | None, model, tokenizer, default_cache: dict,
                 limit: int | None, generation: dict, log: Callable[[str], None]):
        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.shape, self.default_cache = shape_of(model), default_cache
        self.limit, self.log = limit, log
        self.persistent = directory is not None
        group = self.shape.group
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="mlxkv-serve-"))
        else:
            self.directory = check_dir(directory)
            if group.size > 1:  # each rank its own files and index
                self.directory = check_dir(self.directory / f"rank{group.rank}-of-{group.size}")
        self._held = lock_dir(self.directory) if self.persistent else None

    # ----- a conversation's files ----------------------------------------------------------
    def path(self, session_id: str) -> Path:
        """Where the conversation ``session_id`` is saved (its messages; see ``files``)."""
        return self.directory / f"{file_stem(session_id)}.json"

    def files(self, path: Path) -> tuple[Path, Path]:
        """A saved conversation's files: its messages and (this process's part of) its cache."""
        return path, kv_path(path, self.shape.group)

    def size(self, path: Path) -> int:
        """Bytes the conversation saved at ``path`` takes on disk."""
        return sum(p.stat().st_size for p in self.files(path) if p.exists())

    def save(self, session: ChatSession, path: Path) -> tuple[dict[str, str], int]:
        """Save ``session`` at ``path`` (atomic; on the device before an index names it):
        its files' {name: sha256} and their bytes."""
        session.save(path)
        files = self.files(path)
        if self.persistent:
            sync(*files, self.directory)
        return {p.name: sha256_of(p) for p in files}, self.size(path)

    def verify(self, sums: dict[str, str]) -> dict[str, str]:
        """The files of ``sums`` that are missing or fail their checksum, each with which."""
        bad = {}
        for name, want in sums.items():
            try:
                ok = sha256_of(self.directory / name) == want
            except OSError:
                ok = False
            if not ok:
                bad[name] = ("fails its checksum" if (self.directory / name).exists()
                             else "is missing")
        return bad

    LOST = "its saved files are lost: it starts again from the request"

    def load(self, entry: Entry) -> tuple[ChatSession, bool]:
        """The session ``entry`` saved, and whether its history is read through the model
        again. A file that is missing or fails its checksum is never loaded: a damaged cache
        is read again from the saved messages; with damaged messages a whole cache serves
        alone (the request holds the messages), else the session starts again from the
        request. A log line says so; the request is served either way."""
        doc, kv = self.files(entry.path)
        bad = self.verify(entry.sums)
        why = "; ".join(f"{name} {what}" for name, what in bad.items())
        session, note = None, None
        try:
            if doc.name not in bad:
                if kv.name in bad:
                    kv.unlink(missing_ok=True)  # so resume reads the history from the messages
                session = ChatSession.resume(doc, self.model, self.tokenizer, **self.generation)
                note = session.resume_note and (
                    "its cache is read again from its saved messages" if bad
                    else session.resume_note)
            elif kv.name not in bad:
                session = self._cache_alone(kv)
                note = "its saved messages are lost: its saved cache serves alone"
        except MlxkvError as e:
            why = why or str(e)
        if session is None:
            session = ChatSession(self.model, self.tokenizer, cache_config=entry.config,
                                  **self.generation)
            note = self.LOST
        if note:
            self.log(f"session {entry.id}: {note}{f' ({why})' if why else ''}")
        return session, bool(session.resume_note) or note == self.LOST

    def _cache_alone(self, kv: Path) -> ChatSession:
        """A session holding the saved cache ``kv`` and no messages (its next turn's
        messages are the whole conversation: the cache is reused as far as it holds them)."""
        cache, config, tokens, extra = load_cache(kv, self.model)
        session = ChatSession(self.model, self.tokenizer, cache_config=config, **self.generation)
        session.cache, session.cached_tokens = cache, tokens
        session.last_reply_start = int(extra.get("reply_start", len(tokens)))
        return session

    def remove(self, path: Path) -> None:
        """Remove the files of the conversation saved at ``path``."""
        for p in self.files(path):
            p.unlink(missing_ok=True)

    def over_limit(self, saved: list[Entry]) -> list[Entry]:
        """The oldest of the conversations ``saved`` (on disk) to forget so that the rest
        fit inside ``limit``."""
        if self.limit is None:
            return []
        saved, out = sorted(saved, key=lambda e: e.last_used), []
        while saved and sum(e.disk_bytes for e in saved) > self.limit:
            out.append(saved.pop(0))
        return out

    # ----- the index (--kv-dir) -------------------------------------------------------------
    def open(self) -> list[dict] | None:
        """The conversations the directory's index names, each as the fields of its
        ``Entry`` (on disk); None when the index cannot be read (it is set aside and
        logged). Refuses a directory of another model; passes over an entry that cannot be
        read; removes files of ours the index does not name."""
        where, identity = self.directory, self.shape.identity
        try:
            doc = read_index(where)
        except ValueError as e:
            aside = where / f"{INDEX}.damaged"
            (where / INDEX).replace(aside)
            self.log(f"--kv-dir {where}: its index cannot be read ({e}): the conversations "
                     f"saved there are ignored (the index is kept as {aside.name})")
            return None
        if doc is not None and doc["model"] != identity:
            raise InputError(f"--kv-dir {where} holds conversations of the model "
                             f"{_model_words(doc['model'])}, not of the model served here, "
                             f"{_model_words(identity)}: give this model another --kv-dir")
        defaults = json.loads(json.dumps(self.default_cache))  # as JSON reads it back
        if doc is not None and doc.get("default_cache") not in (None, defaults):
            self.log(f"--kv-dir {where} was saved with other default cache settings: its "
                     "conversations continue for requests that ask for their settings")
        wall, now, found = time.time(), time.monotonic(), {}
        for row in doc["sessions"] if doc is not None else []:
            fields = self._fields(row, wall, now)
            if fields is None:
                self.log(f"--kv-dir {where}: passed over an index entry that cannot be read")
                continue
            found[fields["id"]] = fields
        stale = leftovers(where, {name for f in found.values() for name in f["sums"]})
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            self.log(f"--kv-dir {where}: removed {len(stale)} file(s) no saved conversation "
                     "names (left by a save that was interrupted)")
        return list(found.values())

    def _fields(self, row, wall: float, now: float) -> dict | None:
        """A conversation's ``Entry`` fields from its index entry (None if it is not sound)."""
        try:
            sid = row["id"]
            if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
                return None
            config = CacheConfig(**row["cache_config"]).resolve(self.shape.head_dim)
            path, sums = self.path(sid), row["files"]
            # only this conversation's own file names: never a path the index makes up
            if (not isinstance(sums, dict) or set(sums) != {p.name for p in self.files(path)}
                    or not all(isinstance(v, str) for v in sums.values())):
                return None
            fields = dict(id=sid, config=config, path=path, sums=dict(sums),
                          trimmable=bool(row.get("trimmable", True)))
            held = saved_tokens(self.files(path)[1])
            if held is not None and len(held[0]) == int(row["tokens"]):
                fields["tokens"], fields["reply_start"] = held
            # else it is found by its id only, and its load finds what is wrong
            fields["saved_counts"] = tuple(int(row.get(k, 0)) for k in ("seen", "kept", "evicted"))
            fields["saved_at"] = saved_at = float(row.get("saved_at", wall))
            fields["last_used"] = now - max(0.0, wall - saved_at)
            fields["disk_bytes"] = self.size(path)
        except (KeyError, TypeError, ValueError, MlxkvError):
            return None
        return fields

    def write_index(self, saved: list[Entry]) -> None:
        """Write the index naming the conversations ``saved`` (after their files, before
        removing any): a crash at any moment leaves an index whose files are whole."""
        if not self.persistent:
            return
        rows = [{"id": e.id, "cache_config": e.config.to_dict(), "tokens": len(e.tokens),
                 "reply_start": e.reply_start, "trimmable": e.trimmable,
                 **dict(zip(("seen", "kept", "evicted"), e.counts())),
                 "saved_at": e.saved_at, "files": e.sums} for e in saved]
        text = json.dumps({"format": INDEX_FORMAT, "model": self.shape.identity,
                           "default_cache": self.default_cache,
                           "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "sessions": rows},
                          indent=1, ensure_ascii=False)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

        atomic_write(self.directory / INDEX, write)
        sync(self.directory)

    def close(self) -> None:
        """Let go of the directory (``--kv-dir``), or remove the temporary one."""
        if not self.persistent:
            shutil.rmtree(self.directory, ignore_errors=True)
        elif self._held is not None:
            os.close(self._held)
            self._held = None


def read_index(directory: Path) -> dict | None:
    """The index in ``directory`` (None if there is none); ``ValueError`` if it cannot be
    read as one."""
    path = directory / INDEX
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(str(e)) from None
    if (not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT
            or not isinstance(doc.get("model"), dict) or not isinstance(doc.get("sessions"), list)):
        raise ValueError("not an mlxkv serve index")
    return doc


def leftovers(directory: Path, named: set[str]) -> list[Path]:
    """Files of ours in ``directory`` that no conversation in the index names."""
    return [p for p in directory.iterdir() if p.is_file() and p.name not in named
            and (_OURS.fullmatch(p.name) or _TEMP.fullmatch(p.name))]


def _model_words(identity: dict) -> str:
    """A model's identity as a saved cache records it, in words."""
    rest = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in identity.items() if k != "name")
    return f"{identity.get('name')!r} ({rest})"
