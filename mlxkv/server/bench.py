"""``mlxkv bench --serve``: time to first token of a follow-up turn on a long conversation
that the server saved to disk, against the same turn prefilled from scratch, through a
live server on loopback (the client measures, over HTTP, as a user's client would)."""

from __future__ import annotations

import http.client
import json
import statistics
import time
import uuid
from urllib.parse import urlsplit

from ..budget import format_bytes
from ..errors import InputError
from ..generation import chat_tokens
from ..texts import load_text
from . import Service
from .sessions import SessionStore

QUESTIONS = ["Who speaks first?", "Name one place in the text.", "What happens next?",
             "Who is the most important person here?", "Say it in one word.",
             "What is the mood?", "Which line stands out?", "Who is missing?"]


def stream_turn(url: str, body: dict, timeout: float = 600) -> tuple[float, str, dict]:
    """POST a streaming chat completion: (seconds to the first text, the reply, usage)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.perf_counter()
    conn.request("POST", parts.path + "/chat/completions",
                 json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise InputError(f"the server answered {resp.status}: {resp.read()[:300]!r}")
    first, text, use = None, [], {}
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise InputError(f"the server failed mid-stream: {event['error']['message']}")
        use = event.get("usage") or use
        for choice in event["choices"]:
            piece = choice["delta"].get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
    conn.close()
    return (first if first is not None else time.perf_counter() - start), "".join(text), use


def conversation(tokenizer, tokens: int, text: str = "hamlet") -> list[dict]:
    """A first user message of about ``tokens`` tokens (a play's opening) and a question."""
    words = load_text(text).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose message stays within ``tokens``
        mid = (lo + hi + 1) // 2
        msg = [{"role": "user", "content": " ".join(words[:mid]) + "\n\nWho are these people?"}]
        if len(chat_tokens(tokenizer, msg)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return [{"role": "user", "content": " ".join(words[:lo]) + "\n\nWho are these people?"}]


def restore_bench(model, tokenizer, *, name: str, config, tokens: int = 4096,
                  repeats: int = 3, reply_tokens: int = 8) -> dict:
    """Median time to first token of a follow-up turn on a ``tokens``-token conversation:
    restored from disk (another conversation pushed it out of ``--kv-total``) vs. the same
    messages as a new conversation (the whole history prefilled)."""
    if repeats < 1 or tokens < 64:
        raise InputError("--serve-tokens must be >= 64 and --serve-repeats >= 1")
    probe = SessionStore(model, tokenizer, config=config, total=10**12)  # sizes only
    config = probe.config
    need = probe.reserve_bytes(config, tokens + (repeats + 1) * 64)
    probe.close()
    total = 2 * need  # until the long conversation's size is known
    with Service(model, tokenizer, name=name, config=config, total=total).start() as server:
        chat = conversation(tokenizer, tokens)
        seconds, reply, use = stream_turn(server.url, {"messages": chat, "max_tokens": reply_tokens,
                                                       "temperature": 0, "session_id": "long"})
        prompt_tokens = use["prompt_tokens"]
        # room for one turn's reserve beside half of what the long conversation holds: any
        # other conversation's turn sends it to disk (however small it is against its budget)
        total = server.store.total = need + server.store.view()["total_bytes"] // 2
        filler = conversation(tokenizer, tokens, "macbeth")
        restored, prefilled, cached = [], [], []
        for r in range(repeats):
            # another long conversation: the first one goes to disk
            stream_turn(server.url, {"messages": filler, "max_tokens": 1, "temperature": 0,
                                     "session_id": f"other{r}"})
            chat = chat + [{"role": "assistant", "content": reply},
                           {"role": "user", "content": QUESTIONS[r % len(QUESTIONS)]}]
            where = {row["id"]: row["where"] for row in server.store.view()["sessions"]}
            if where.get("long") != "disk":
                raise InputError("the long conversation was not saved to disk")
            t, reply, use = stream_turn(server.url, {"messages": chat, "max_tokens": reply_tokens,
                                                     "temperature": 0, "session_id": "long"})
            restored.append(t)
            cached.append(use["prompt_tokens_details"]["cached_tokens"])
            t, _, _ = stream_turn(server.url, {"messages": chat, "max_tokens": reply_tokens,
                                               "temperature": 0,
                                               "session_id": f"fresh-{uuid.uuid4().hex[:8]}"})
            prefilled.append(t)
        view = server.store.view()
    disk = statistics.median(restored)
    fresh = statistics.median(prefilled)
    return {"tokens": prompt_tokens, "cache": config.describe(), "kv_total": format_bytes(total),
            "ttft_restored_s": round(disk, 3), "ttft_prefilled_s": round(fresh, 3),
            "speedup": round(fresh / disk, 1), "repeats": repeats,
            "restored_s": [round(t, 3) for t in restored],
            "prefilled_s": [round(t, 3) for t in prefilled],
            "cached_tokens": cached, "restored_from_disk": view["restored_from_disk"]}
