"""The HTTP side: a Starlette app (run by uvicorn) with OpenAI's endpoints.

Starlette + uvicorn: a small, well-kept ASGI stack whose ``StreamingResponse`` sends
server-sent events as the tokens come and notices a client that has gone; no model layer
(pydantic) is needed since ``protocol.py`` checks requests itself. Handlers never touch the
model: they queue a ``Job`` for the worker thread and turn what it emits into responses.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import protocol
from .protocol import APIError, bad
from .worker import Job, Worker

KEEPALIVE = 1.0  # seconds between keep-alive comments while a stream waits its turn


class ClientGone(Exception):
    pass


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """The app's state: the worker, how requests are read (``parse(kind, body)``, with the
    server's defaults), the names the model answers to, the limits."""

    def __init__(self, worker: Worker, *, parse, models: tuple[str, ...],
                 api_key: str | None = None, max_body: int = 8_000_000):
        self.worker, self.store, self.parse, self.models = worker, worker.store, parse, models
        self.api_key, self.max_body = api_key, max_body
        self.started = int(time.time())

    # ----- plumbing ----------------------------------------------------------------------
    def authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode()):
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(self, request: HTTPRequest):
        length = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is over {self.max_body} bytes",
                           code="request_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body:
                raise too_big
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({e})") from None

    @staticmethod
    async def next_item(items: asyncio.Queue, request: HTTPRequest) -> dict:
        """The job's next item; ``ClientGone`` if the client disconnects meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(items.get(), KEEPALIVE)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None

    # ----- endpoints ---------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.models[0],
                             "queued": self.worker.waiting, "served": self.worker.served})

    async def list_models(self, request: HTTPRequest) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.models[0], "object": "model", "created": self.started, "owned_by": "mlxkv"}]})

    async def kv(self, request: HTTPRequest) -> JSONResponse:
        self.authorize(request)
        return JSONResponse(self.store.view())

    async def chat(self, request: HTTPRequest):
        return await self.complete(request, "chat")

    async def text(self, request: HTTPRequest):
        return await self.complete(request, "text")

    async def complete(self, request: HTTPRequest, kind: str):
        self.authorize(request)
        body = await self.read_json(request)
        req = self.parse(kind, body)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def emit(item: dict) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop has closed (the server is stopping)
                job.cancelled.set()

        job = Job(req, emit=emit)
        self.worker.submit(job)
        try:
            item = await self.next_item(items, request)
            if item["type"] == "error":
                return error_response(item["error"])
            if req.stream:  # from here the stream's generator owns the job
                return StreamingResponse(self.stream(req, job, items, item),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, finish = [], "length"
            while item["type"] == "delta":
                text.append(item["text"])
                finish = item["finish"] or "length"
                item = await self.next_item(items, request)
        except (ClientGone, asyncio.CancelledError) as e:
            job.cancelled.set()
            if isinstance(e, ClientGone):
                return Response(status_code=499)  # nobody reads it
            raise
        if item["type"] == "error":
            return error_response(item["error"])
        return JSONResponse(protocol.completion(req, "".join(text), finish, item["usage"],
                                                item["session"]))

    async def stream(self, req, job: Job, items: asyncio.Queue, item: dict):
        """Server-sent events: a first chunk (the role), one per piece of text, one with the
        finish reason, the usage if asked, then ``[DONE]``. A client that goes away closes
        this generator, which cancels the job."""
        try:
            yield sse(protocol.chunk(req, role=req.kind == "chat", session=item.get("session")))
            while True:
                if item["type"] == "delta":
                    if item["text"]:
                        yield sse(protocol.chunk(req, item["text"]))
                    if item["finish"]:
                        yield sse(protocol.chunk(req, finish=item["finish"]))
                elif item["type"] == "done":
                    if req.include_usage:
                        yield sse(protocol.chunk(req, use=item["usage"], session=item["session"]))
                    yield "data: [DONE]\n\n"
                    return
                else:  # an error after the stream began: OpenAI's error object as an event
                    yield sse(item["error"].body())
                    return
                while True:
                    try:
                        item = await asyncio.wait_for(items.get(), KEEPALIVE)
                        break
                    except asyncio.TimeoutError:
                        yield ": waiting\n\n"  # a comment: keeps the connection, finds a gone client
        finally:
            job.cancelled.set()  # a no-op once the job is done

    def app(self) -> Starlette:
        async def on_http_error(request, exc: HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: "
                                           f"{exc.detail}", code=code))

        async def on_api_error(request, exc: APIError):
            return error_response(exc)

        async def on_bug(request, exc: Exception):
            return error_response(APIError(500, f"internal error ({type(exc).__name__}); see the "
                                           "server's log", type="server_error"))

        routes = [Route("/health", self.health), Route("/v1/models", self.list_models),
                  Route("/v1/kv", self.kv),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.text, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={
            HTTPException: on_http_error, APIError: on_api_error, Exception: on_bug})
