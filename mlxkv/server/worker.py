"""The one thread that runs the model: requests are queued and served in order.

MLX evaluates one graph at a time on one device, and every session's cache belongs to the
same model, so the HTTP side never touches the model: it puts a ``Job`` on the queue and
reads what the job emits. A job whose client has gone (``cancelled``) is skipped, or its
generation stops at the next token.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MlxkvError
from .protocol import APIError, Request, bad
from .sessions import SessionStore


@dataclass
class Job:
    request: Request
    emit: Callable[[dict], None]  # called on the worker thread with each item
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(self, store: SessionStore):
        self.store = store
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.served = 0
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="mlxkv-worker", daemon=True)

    def start(self) -> "Worker":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    @property
    def alive(self) -> bool:
        """Its thread still runs (``stop`` timed out): it may be using a session."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the job being served at its next token, cancel the queued ones, and end."""
        current = self.current
        if current is not None:
            current.cancelled.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.emit({"type": "error", "error": APIError(503, "the server is shutting down",
                                                             type="server_error")})
        self.jobs.put(None)
        self._thread.join(timeout)
        if self.store.group.size > 1:
            self.store.group.broadcast(None)  # the followers stop too

    def _run(self) -> None:
        group = self.store.group
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self.current = job
            if group.size > 1:  # the other ranks serve the same request in step
                group.broadcast({"kind": job.request.kind, "body": job.request.body})
            try:
                self.store.serve(job.request, job.emit, job.cancelled.is_set)
            except APIError as e:
                job.emit({"type": "error", "error": e})
            except MlxkvError as e:  # bad input found by the library (settings, context)
                job.emit({"type": "error", "error": bad(str(e))})
            except Exception as e:  # a bug: the server keeps serving, the log has the trace
                traceback.print_exc(file=sys.stderr)
                job.emit({"type": "error", "error": APIError(
                    500, f"internal error ({type(e).__name__}); see the server's log",
                    type="server_error")})
            self.current = None
            self.served += 1


def follow(store: SessionStore, parse: Callable[[str, dict], Request]) -> None:
    """A rank other than 0 in a group: serve what rank 0 serves, in the same order, until
    it stops. Its errors are rank 0's too (the same checks on the same state): rank 0
    reports them; here they are passed over."""
    while (message := store.group.broadcast(None)) is not None:
        try:
            store.serve(parse(message["kind"], message["body"]), lambda item: None, lambda: False)
        except (APIError, MlxkvError):
            continue
