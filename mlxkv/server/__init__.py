"""``mlxkv serve``: an OpenAI-compatible HTTP server whose conversations share one KV budget.

- ``protocol.py``: OpenAI's request and response shapes, checked; errors as OpenAI's objects;
- ``sessions.py``: conversations matched by token prefix, kept within ``--kv-total`` by
  saving the least recently used to disk;
- ``worker.py``: the one thread that runs the model, serving queued requests in order;
- ``http.py``: the Starlette app (endpoints, streaming, auth, limits).

- ``disk.py``: the saved conversations' files, and ``--kv-dir``'s index that keeps them
  across restarts.

``Service`` puts them together on a socket: ``run()`` serves until Ctrl-C, ``start()`` in
a background thread (tests, benchmarks), ``close()`` stops, then saves the conversations
in memory to ``directory`` (``--kv-dir``) for the next start, or without one removes the
saved conversations.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from functools import partial
from pathlib import Path

from ..errors import InputError
from . import protocol
from .http import Server
from .sessions import SessionStore
from .worker import Worker, follow

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


class Service:
    """The server for ``model`` (see the module docstring); ``url`` is its API base."""

    def __init__(self, model, tokenizer, *, name: str, config, total: int,
                 directory: Path | None = None, disk_total: int | None = None,
                 generation: dict | None = None,
                 max_tokens: int = 512, sampling=None, api_key: str | None = None,
                 max_body: int = 8_000_000, host: str = "127.0.0.1", port: int = 0,
                 aliases: tuple[str, ...] = ()):
        try:
            import uvicorn
        except ModuleNotFoundError:
            raise InputError("mlxkv serve needs its HTTP stack: pip install 'mlxkv[serve]'") from None
        from ..generation import Sampling

        self.store = SessionStore(model, tokenizer, config=config, total=total,
                                  directory=directory, disk_total=disk_total,
                                  generation=generation)
        models = (name, *[a for a in aliases if a != name])
        self.parse = partial(protocol.parse, models=models, default_config=self.store.config,
                             max_tokens=max_tokens, sampling=sampling or Sampling())
        self.leader = self.store.group.leader
        self.url = self.server = self.sock = None
        self._thread: threading.Thread | None = None
        if not self.leader:  # another rank of a group: no HTTP, it follows rank 0
            return
        self.worker = Worker(self.store).start()
        self.http = Server(self.worker, parse=self.parse, models=models, api_key=api_key,
                           max_body=max_body)
        try:
            self.sock = _bind(host, port)
        except InputError:
            self.worker.stop()
            self.store.close()
            raise
        bound = self.sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/v1"
        self.server = uvicorn.Server(uvicorn.Config(
            self.http.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=5))

    def run(self) -> None:
        """Serve in this thread until Ctrl-C or SIGTERM (then stop cleanly); another rank
        of a group follows rank 0 until it stops."""
        if not self.leader:
            try:
                follow(self.store, self.parse)
            finally:
                self.store.close()
            return

        def stop(signum, frame):
            raise SystemExit(0)

        # uvicorn shuts down gracefully on a signal, then raises it again for the handler
        # that was there before: for SIGTERM, this one (not the default: killed at once)
        previous = signal.signal(signal.SIGTERM, stop)
        try:
            self.server.run(sockets=[self.sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.close()

    def start(self, timeout: float = 30.0) -> "Service":
        """Serve in a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="mlxkv-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        if not self.leader:
            self.store.close()
            return
        self.server.should_exit = True
        try:
            if self._thread is not None:
                self._thread.join(10)
            self.worker.stop()  # in a group it tells the others, which may be gone already
        finally:
            self.store.close(save=not self.worker.alive)
            self.sock.close()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
