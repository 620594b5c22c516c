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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

from ..errors import InputError
from ..persist import atomic_write

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


def checksums(paths) -> dict[str, str]:
    """{file name: sha256} of ``paths``."""
    return {Path(p).name: sha256_of(Path(p)) for p in paths}


def damaged(directory: Path, sums: dict[str, str]) -> list[str]:
    """The files of ``sums`` that are missing or do not match their checksum."""
    bad = []
    for name, want in sums.items():
        try:
            ok = sha256_of(directory / name) == want
        except OSError:
            ok = False
        if not ok:
            bad.append(name)
    return bad


def sync(*paths: Path) -> None:
    """Flush files (or directories: their entries, i.e. renames) to the device."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_index(directory: Path, doc: dict) -> None:
    text = json.dumps(doc, indent=1, ensure_ascii=False)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(directory / INDEX, write)
    sync(directory)


def index_doc(identity: dict, default_cache: dict, sessions: list[dict]) -> dict:
    return {"format": INDEX_FORMAT, "model": identity, "default_cache": default_cache,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "sessions": sessions}


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


def leftovers(directory: Path, named: set[str]) -> list[Path]:
    """Files of ours in ``directory`` that no conversation in the index names."""
    return [p for p in directory.iterdir() if p.is_file() and p.name not in named
            and (_OURS.fullmatch(p.name) or _TEMP.fullmatch(p.name))]
