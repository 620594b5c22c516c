"""OpenAI's request and response shapes: reading a request body into a checked
``Request``, and the JSON objects (completions, chunks, errors) the server sends back.

Everything a client can get wrong is an ``APIError`` with a 4xx status and OpenAI's error
object (``{"error": {"message", "type", "param", "code"}}``), so clients show the reason.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .. import settings
from ..cache.config import CacheConfig
from ..errors import InputError
from ..generation import Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_STOPS = 4
# Extra body fields that are cache settings (read by mlxkv.settings, as the CLI's flags)
CACHE_WORDS = ("max_kv_size",)


class APIError(Exception):
    """An error the client gets as OpenAI's error object with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Request:
    """A checked chat or text completion request."""

    kind: str                                   # "chat" or "text"
    model: str
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | list[int] | None = None          # text
    stream: bool = False
    include_usage: bool = False
    max_tokens: int = 512
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    config: CacheConfig = field(default_factory=CacheConfig)
    session_id: str | None = None
    id: str = ""
    created: int = 0
    body: dict = field(default_factory=dict)  # as sent (the other ranks of a group read it)


def _number(body: dict, name: str, low: float, high: float, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad(f"{name} must be a number from {low} to {high} (got {value!r})", name)
    return value


def _whole(body: dict, name: str, low: int, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise bad(f"{name} must be a whole number >= {low} (got {value!r})", name)
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}]: only text content is supported (got {kind!r})",
                          f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts",
              f"messages[{i}].content")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = ROLES.get(m.get("role"))
        if role is None:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)} "
                      f"(got {m.get('role')!r})", f"messages[{i}].role")
        out.append({"role": role, "content": _content(m, i)})
    if out[-1]["role"] == "assistant":
        raise bad("the last message is the assistant's: continuing a reply is not supported",
                  "messages")
    return out


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
        return prompt
    raise bad("prompt must be a non-empty string (or one list of token ids)", "prompt")


def _unsupported(body: dict) -> None:
    if body.get("n") not in (None, 1):
        raise bad("only n=1 is supported", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported (use repetition_penalty)", name)
    for name in ("logprobs", "echo"):
        if body.get(name) not in (None, False, 0):
            raise bad(f"{name} is not supported", name)
    for name in ("tools", "functions", "suffix"):
        if body.get(name):
            raise bad(f"{name} is not supported", name)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) for s in stops)):
        raise bad(f"stop must be a string or a list of up to {MAX_STOPS} strings", "stop")
    return [s for s in stops if s]


def _cache_config(body: dict, default: CacheConfig) -> CacheConfig:
    words = {k: v for k, v in body.items() if k.startswith("kv_") or k in CACHE_WORDS}
    if not words:
        return default
    try:
        return settings.apply(default, words).check()
    except InputError as e:
        raise bad(f"cache settings: {e}", next(iter(words)), "invalid_cache_settings") from None


def parse(kind: str, body: Any, *, models: tuple[str, ...], default_config: CacheConfig,
          max_tokens: int, sampling: Sampling) -> Request:
    """Check a request ``body`` (parsed JSON) for the ``kind`` of endpoint ("chat" or
    "text"); ``models`` are the names the served model answers to (the first is its id);
    what a request leaves out comes from ``default_config``, ``max_tokens`` and
    ``sampling`` (the server's flags)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model") or models[0]
    if not isinstance(model, str) or model not in models:
        raise APIError(404, f"the model {model!r} is not served here (this server serves "
                            f"{models[0]!r}, see /v1/models)", param="model",
                       code="model_not_found")
    _unsupported(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    session_id = body.get("session_id")
    if session_id is not None and not (isinstance(session_id, str)
                                       and SESSION_ID.fullmatch(session_id)):
        raise bad("session_id must be 1-64 letters, digits, '-' or '_'", "session_id")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    tokens = _whole({"max_tokens": limit}, "max_tokens", 1, max_tokens)
    d = sampling
    try:
        sampling = Sampling(temp=_number(body, "temperature", 0, 2, d.temp),
                            top_p=_number(body, "top_p", 0, 1, d.top_p),
                            top_k=_whole(body, "top_k", 0, d.top_k),
                            min_p=_number(body, "min_p", 0, 1, d.min_p),
                            repetition_penalty=_number(body, "repetition_penalty", 0, 10,
                                                       d.repetition_penalty),
                            seed=_whole(body, "seed", 0, d.seed))
    except InputError as e:
        raise bad(str(e)) from None
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Request(kind=kind, model=models[0],
                   messages=_messages(body) if kind == "chat" else None,
                   prompt=_prompt(body) if kind == "text" else None,
                   stream=stream, include_usage=bool(options.get("include_usage")),
                   max_tokens=tokens, sampling=sampling, stop=_stop(body),
                   config=_cache_config(body, default_config), session_id=session_id,
                   id=f"{prefix}-{uuid.uuid4().hex[:24]}", created=int(time.time()), body=body)


# ----- responses -----------------------------------------------------------------------
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion(req: Request, text: str, finish: str, use: dict, session: str) -> dict:
    """The whole (non-streaming) response."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": FINISH[finish], "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": FINISH[finish], "logprobs": None}
        obj = "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model,
            "choices": [choice], "usage": use, "session_id": session}


def chunk(req: Request, text: str | None = None, finish: str | None = None, *,
          role: bool = False, use: dict | None = None, session: str | None = None) -> dict:
    """One server-sent event's object of a streaming response (``use``: the usage chunk,
    which has no choices)."""
    reason = None if finish is None else FINISH[finish]
    if req.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
        obj = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}]
        obj = "text_completion"
    out = {"id": req.id, "object": obj, "created": req.created, "model": req.model,
           "choices": [] if use is not None else choices}
    if use is not None:
        out["usage"] = use
    if session is not None:
        out["session_id"] = session
    return out
