"""``mlxkv serve`` against live servers on loopback: the official ``openai`` client and
``curl``. The mechanics run on the tiny random-weight llama; the claims (8 concurrent
clients inside ``--kv-total``, a session restored from disk gives the same tokens) on the
real model."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import mlxkv
from helpers import write_tiny_gguf
from mlxkv.cache.config import CacheConfig
from mlxkv.errors import InputError
from mlxkv.server import Service
from mlxkv.server.sessions import SessionStore

openai = pytest.importorskip("openai")  # in the test extra: always there in CI

CURL = shutil.which("curl")
HELLO = [{"role": "user", "content": "the cat sat on the mat"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    return mlxkv.load(str(path))


def serve(model_tok, tmp_path, **kw):
    model, tok = model_tok
    kw.setdefault("config", CacheConfig())
    kw.setdefault("total", 64_000_000)
    return Service(model, tok, name="tiny", directory=tmp_path / "kv", **kw).start()


def client(service, **kw):
    return openai.OpenAI(base_url=service.url, api_key=kw.pop("api_key", "none"), max_retries=0,
                         timeout=60, **kw)


def curl(service, path, body=None, *, method=None, headers=()):
    """(status, parsed JSON) of a request made with curl."""
    assert CURL, "the server tests call curl as a client: install it (apt-get install curl)"
    cmd = [CURL, "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "60"]
    if method:
        cmd += ["-X", method]
    for h in headers:
        cmd += ["-H", h]
    if body is not None:
        cmd += ["-H", "content-type: application/json", "--data-binary", "@-"]
    r = subprocess.run(cmd + [service.url + path], input=body, capture_output=True, text=True,
                       timeout=90)
    text, status = r.stdout.rsplit("\n", 1)
    return int(status), json.loads(text)


def kv(service):
    return curl(service, "/kv")[1]


def stream_chat(c, messages, **kw):
    """(text, finish reason, usage) of a streamed chat completion read to its end."""
    parts, finish, usage = [], None, None
    for ch in c.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, **kw):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        usage = ch.usage or usage
    return "".join(parts), finish, usage


# ----- mechanics, on the tiny model --------------------------------------------------------
def test_chat_streamed_and_not_give_the_same_greedy_reply(tiny, tmp_path):
    with serve(tiny, tmp_path) as s:
        c = client(s)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        whole = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
        text, finish, usage = stream_chat(c, HELLO, max_tokens=12)
        assert whole.choices[0].message.content == text
        assert whole.choices[0].finish_reason == finish in ("stop", "length")
        assert usage.prompt_tokens == whole.usage.prompt_tokens > 5
        assert usage.completion_tokens == whole.usage.completion_tokens >= 1
        text = c.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0)
        assert text.object == "text_completion" and text.usage.completion_tokens >= 1


def test_a_follow_up_reuses_the_conversations_cache(tiny, tmp_path):
    with serve(tiny, tmp_path) as s:
        c = client(s)
        first = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        history = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                           {"role": "user", "content": "and the dog"}]
        second = c.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
        # everything up to the reply is in the cache: only the new turn is fed
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        view = kv(s)
        assert len(view["sessions"]) == 1 and view["sessions"][0]["tokens_seen"] >= second.usage.prompt_tokens
        assert 0 < view["total_bytes"] <= view["limit_bytes"]
        other = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b c"}],
                                          max_tokens=4, temperature=0)
        assert other.usage.prompt_tokens_details.cached_tokens == 0 and len(kv(s)["sessions"]) == 2


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(tiny, tmp_path):
    with serve(tiny, tmp_path, max_body=20_000) as s:
        cases = [
            ('{"messages": [', 400, None),
            (json.dumps({"model": "gpt-4", "messages": HELLO}), 404, "model_not_found"),
            (json.dumps({"messages": HELLO, "temperature": 3}), 400, None),
            (json.dumps({"messages": HELLO, "top_p": "high"}), 400, None),
            (json.dumps({"messages": HELLO, "n": 2}), 400, None),
            (json.dumps({"messages": HELLO, "max_tokens": 0}), 400, None),
            (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), 400, None),
            (json.dumps({"messages": HELLO, "kv_bits": 5}), 400, "invalid_cache_settings"),
            (json.dumps({"messages": HELLO, "session_id": "../../etc/passwd"}), 400, None),
            # the tiny model's context is 512 tokens; a full cache cannot go past it
            (json.dumps({"messages": [{"role": "user", "content": "cat " * 600}]}), 400,
             "context_length_exceeded"),
            (json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]}), 413, None),
        ]
        for body, status, code in cases:
            got, doc = curl(s, "/chat/completions", body)
            assert got == status, (body[:60], doc)
            assert doc["error"]["message"] and (code is None or doc["error"]["code"] == code)
        assert curl(s, "/nowhere")[0] == 404 and curl(s, "/models", method="DELETE")[0] == 405
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client(s).chat.completions.create(model="tiny", messages=HELLO, temperature=-1)
        ok = client(s).chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
        assert ok.choices[0].message.content is not None


def test_api_key(tiny, tmp_path):
    with serve(tiny, tmp_path, api_key="sekrit") as s:
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        status, doc = curl(s, "/models")
        assert status == 401 and doc["error"]["code"] == "invalid_api_key"
        assert client(s, api_key="sekrit").models.list().data[0].id == "tiny"
        assert curl(s, "/../health")[0] == 200  # the health check needs no key


def test_sessions_over_the_total_go_to_disk_and_come_back(tiny, tmp_path):
    # a turn reserves its budget (300 KB); a conversation afterwards holds ~134 KB: room
    # for one of them beside the turn being served
    config = CacheConfig(budget=300_000)
    with serve(tiny, tmp_path, config=config, total=450_000) as s, \
            serve(tiny, tmp_path / "roomy", config=config, total=10_000_000) as roomy:
        c, ref = client(s), client(roomy)
        chats = [[{"role": "user", "content": f"the {w} sat on the mat"}] for w in ("cat", "dog", "cow")]
        for chat in chats:
            for svc in (c, ref):
                r = svc.chat.completions.create(model="tiny", messages=chat, max_tokens=6, temperature=0,
                                                extra_body={"session_id": chat[0]["content"][4:7]})
            chat += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": "and then"}]
            view = kv(s)
            assert view["total_bytes"] <= view["limit_bytes"]
        view = kv(s)
        where = {row["id"]: row["where"] for row in view["sessions"]}
        assert where["cat"] == "disk" and view["saved_to_disk"] >= 1
        files = os.listdir(tmp_path / "kv")
        assert files and not any("cat" in f for f in files)  # named by a digest, not the id
        # the conversation on disk comes back with its cache: no re-prefill, same tokens
        back = c.chat.completions.create(model="tiny", messages=chats[0], max_tokens=6, temperature=0,
                                         extra_body={"session_id": "cat"})
        kept = ref.chat.completions.create(model="tiny", messages=chats[0], max_tokens=6, temperature=0,
                                           extra_body={"session_id": "cat"})
        assert back.usage.prompt_tokens_details.cached_tokens > 0
        assert back.choices[0].message.content == kept.choices[0].message.content
        assert kv(s)["restored_from_disk"] == 1 and kv(s)["total_bytes"] <= 450_000


def test_a_client_that_disconnects_cancels_its_generation(tiny, tmp_path):
    with serve(tiny, tmp_path, config=CacheConfig(window=64)) as s:
        stream = client(s).chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=1_000_000, temperature=1.0, seed=1, stream=True,
            extra_body={"session_id": "gone"})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 30
        while s.worker.served < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.worker.served == 1  # the generation ended without reaching max_tokens
        seen = kv(s)["sessions"][0]["tokens_seen"]
        assert seen < 100_000
        assert client(s).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)


def test_reserve_bounds_what_a_cache_takes(tiny, tmp_path):
    from mlxkv.chat import ChatSession

    model, tok = tiny
    store = SessionStore(model, tok, config=CacheConfig(), total=10**9, directory=tmp_path,
                         generation={"prefill_step": 64})
    for config, turns in ((CacheConfig(), 2), (CacheConfig(window=40), 4),
                          (CacheConfig(budget=200_000), 4)):
        session = ChatSession(model, tok, cache_config=config, prefill_step=64)
        for turn in range(turns):  # the full cache stays inside the tiny model's 512 tokens
            list(session.send("the cat sat on the mat " * 4, max_tokens=20))
            n = len(session.cached_tokens)
            used = mlxkv.cache_stats(session.cache).nbytes
            assert 0 < used <= store.reserve_bytes(config, n), (config, n)
    store.close()


def test_serve_command_on_loopback(smollm, tmp_path):
    """The real command on the default model with the chat defaults: starts, answers
    curl, refuses a taken port, stops on SIGTERM and removes its saved sessions."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "mlxkv.cli", "serve", "--port", "0",
                             "--kv-budget", "8MB", "--kv-total", "20MB"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "127.0.0.1" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]

        class S:  # what curl() needs
            pass

        S.url = url
        status, doc = curl(S, "/chat/completions", json.dumps({"messages": HELLO, "max_tokens": 4}))
        assert status == 200 and doc["choices"][0]["message"]["role"] == "assistant"
        assert doc["choices"][0]["message"]["content"]
        assert curl(S, "/kv")[1]["limit_bytes"] == 20_000_000
        port = url.split(":")[2].split("/")[0]
        taken = subprocess.run([sys.executable, "-m", "mlxkv.cli", "serve", "--port", port],
                               capture_output=True, text=True, timeout=120)
        assert taken.returncode == 2 and "cannot listen" in taken.stderr
        assert "Traceback" not in taken.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not [p for p in os.listdir(tmp_path) if p.startswith("mlxkv-serve-")]
    finally:
        proc.kill()
        proc.wait()


# ----- claims, on the real model -----------------------------------------------------------
def test_eight_concurrent_streaming_clients_stay_inside_the_total(smollm, tmp_path):
    """8 clients, two turns each, all streaming at once: every reply complete, every second
    turn served from its conversation's cache (kept or restored from disk), and /v1/kv
    never above --kv-total while they run."""
    config = CacheConfig(key_bits=8, value_bits=8, budget=4_000_000)
    with serve(smollm, tmp_path, config=config, total=12_000_000) as s:
        peaks, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                view = kv(s)
                peaks.append((view["total_bytes"], view["limit_bytes"]))
                time.sleep(0.05)

        def converse(i, out):
            c = client(s)
            chat = [{"role": "user", "content": f"Name a fruit that starts with the letter {'ABCDEFGH'[i]}."}]
            for turn in range(2):
                text, finish, usage = stream_chat(c, chat, max_tokens=16)
                out.append((turn, text, finish, usage))
                chat += [{"role": "assistant", "content": text},
                         {"role": "user", "content": "Another one, please."}]

        watcher = threading.Thread(target=watch)
        watcher.start()
        results = [[] for _ in range(8)]
        threads = [threading.Thread(target=converse, args=(i, results[i])) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        stop.set()
        watcher.join()
        assert not any(t.is_alive() for t in threads)
        for turns in results:
            assert [t[0] for t in turns] == [0, 1]
            for turn, text, finish, usage in turns:
                assert text and finish in ("stop", "length") and usage.completion_tokens >= 1
            first, second = turns[0][3], turns[1][3]
            assert second.prompt_tokens_details.cached_tokens >= first.prompt_tokens
        assert peaks and all(total <= limit for total, limit in peaks)
        view = kv(s)
        assert len(view["sessions"]) == 8 and view["saved_to_disk"] >= 1 and view["restored_from_disk"] >= 1


def test_a_session_restored_from_disk_gives_the_tokens_of_one_kept_in_memory(smollm, tmp_path):
    config = CacheConfig(key_bits=4, value_bits=4, budget=6_000_000)
    replies = {}
    for name, total in (("kept", 100_000_000), ("spilled", 7_000_000)):
        with serve(smollm, tmp_path / name, config=config, total=total) as s:
            c = client(s)
            chat = [{"role": "user", "content": "Tell me about the history of Paris."}]
            r = c.chat.completions.create(model="tiny", messages=chat, max_tokens=24, temperature=0)
            chat += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": "And what about its museums?"}]
            # another conversation: on the small server the first one goes to disk
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi!"}],
                                      max_tokens=24, temperature=0)
            on_disk = kv(s)["sessions_on_disk"]
            r = c.chat.completions.create(model="tiny", messages=chat, max_tokens=24, temperature=0)
            replies[name] = (r.choices[0].message.content, on_disk, kv(s)["restored_from_disk"],
                             r.usage.prompt_tokens_details.cached_tokens)
    assert replies["kept"][1:3] == (0, 0) and replies["spilled"][1:3] == (1, 1)
    assert replies["spilled"][3] == replies["kept"][3] > 24  # the history was not fed again
    assert replies["spilled"][0] == replies["kept"][0]


def test_saved_sessions_over_the_disk_limit_are_forgotten_oldest_first(tiny, tmp_path):
    config = CacheConfig(budget=300_000)
    with serve(tiny, tmp_path, config=config, total=450_000, disk_total=150_000) as s:
        c = client(s)
        for w in ("cat", "dog", "cow", "pig"):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"a {w}"}],
                                      max_tokens=3, temperature=0, extra_body={"session_id": w})
        view = kv(s)
        assert view["removed_from_disk"] >= 1 and view["disk_bytes"] <= 150_000
        ids = [row["id"] for row in view["sessions"]]
        assert "cat" not in ids and "pig" in ids
        files = [f for f in os.listdir(tmp_path / "kv") if not f.startswith("index.")]
        assert len(files) == 2 * view["sessions_on_disk"]
        again = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a cat"}],
                                          max_tokens=3, temperature=0, extra_body={"session_id": "cat"})
        assert again.usage.prompt_tokens_details.cached_tokens == 0  # read again from the start


# ----- --kv-dir: conversations across restarts, on the tiny model ---------------------------
def turn(c, messages, sid=None):
    """A greedy chat turn (in the session ``sid`` when given)."""
    extra = {"extra_body": {"session_id": sid}} if sid else {}
    return c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                     **extra)


def then(messages, reply, text="and then?"):
    return messages + [{"role": "assistant", "content": reply.choices[0].message.content},
                       {"role": "user", "content": text}]


def stem(sid):
    return hashlib.sha256(sid.encode()).hexdigest()[:32]


def flip(path):
    """Flip one byte in the middle of ``path`` (the arrays, for a cache file)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CHATS = {"cat": [{"role": "user", "content": "the cat sat on the mat"}],
         None: [{"role": "user", "content": "a dog ran in the park"}]}  # found by its prefix


def test_kv_dir_conversations_continue_after_a_restart(tiny, tmp_path):
    """Conversations in memory when a server stops are saved in --kv-dir; a new server on
    it continues them from their saved caches (not read through the model again) with the
    greedy tokens of one process that kept them."""
    with serve(tiny, tmp_path / "one") as one:  # the reference: both turns in one process
        c = client(one)
        histories = {sid: then(chat, turn(c, chat, sid)) for sid, chat in CHATS.items()}
        kept = {sid: turn(c, history, sid) for sid, history in histories.items()}
    with serve(tiny, tmp_path) as first:
        c = client(first)
        for sid, chat in CHATS.items():
            assert then(chat, turn(c, chat, sid)) == histories[sid]
    index = json.loads((tmp_path / "kv" / "index.json").read_text())
    assert index["model"] == mlxkv.shape_of(tiny[0]).identity and len(index["sessions"]) == 2
    row = next(r for r in index["sessions"] if r["id"] == "cat")
    assert set(row["files"]) == {f"{stem('cat')}.json", f"{stem('cat')}.kv.safetensors"}
    assert row["tokens"] > 5 and row["cache_config"] == CacheConfig().to_dict()
    with serve(tiny, tmp_path) as again:
        assert kv(again)["sessions_on_disk"] == kv(again)["resumed_at_start"] == 2
        c = client(again)
        for sid, history in histories.items():
            back = turn(c, history, sid)
            assert back.choices[0].message.content == kept[sid].choices[0].message.content
            cached = back.usage.prompt_tokens_details.cached_tokens
            assert cached == kept[sid].usage.prompt_tokens_details.cached_tokens > 5
        view = kv(again)
        assert view["restored_from_disk"] == 2 and view["rebuilt_from_history"] == 0
        assert len(view["sessions"]) == 2  # the unnamed one was found by its tokens


def test_a_damaged_saved_file_is_read_again_never_served(tiny, tmp_path, capsys):
    """A flipped byte fails a file's checksum and the file is never loaded: a damaged cache
    is read again from the saved messages; with damaged messages the (whole) cache serves
    alone; with both damaged the conversation starts again from the request. Each is a
    log line, and the request succeeds. Leftovers of an interrupted save are removed."""
    sids = ("cat", "dog", "cow")
    with serve(tiny, tmp_path) as s:
        c = client(s)
        histories = {sid: then(HELLO, turn(c, HELLO, sid)) for sid in sids}
    kvdir = tmp_path / "kv"
    flip(kvdir / f"{stem('cat')}.kv.safetensors")
    flip(kvdir / f"{stem('dog')}.json")
    flip(kvdir / f"{stem('cow')}.json")
    (kvdir / f"{stem('cow')}.kv.safetensors").unlink()
    leftover = kvdir / f".{stem('pig')}.kv.safetensors.x1y2.safetensors"
    leftover.write_bytes(b"half a file")
    (kvdir / "notes.txt").write_text("not ours")
    with serve(tiny, tmp_path) as s:
        c = client(s)
        replies = {sid: turn(c, history, sid) for sid, history in histories.items()}
        assert all(r.choices[0].message.content is not None for r in replies.values())
        cached = {sid: r.usage.prompt_tokens_details.cached_tokens for sid, r in replies.items()}
        assert cached["cat"] > 0 and cached["dog"] > 0 and cached["cow"] == 0
        view = kv(s)
        assert view["rebuilt_from_history"] == 2 and view["restored_from_disk"] == 1
    err = capsys.readouterr().err
    assert (f"session cat: its cache is read again from its saved messages "
            f"({stem('cat')}.kv.safetensors fails its checksum)") in err
    assert "session dog: its saved messages are lost: its saved cache serves alone" in err
    assert "session cow: its saved files are lost" in err and "kv.safetensors is missing" in err
    assert "removed 1 file(s)" in err
    assert not leftover.exists() and (kvdir / "notes.txt").exists()


def test_kv_dir_errors(tiny, tmp_path, capsys):
    """A --kv-dir in use or of another model is refused (naming both models); an index that
    cannot be read is logged and its conversations ignored; a --kv-dir that cannot be
    written is one line."""
    model, tok = tiny
    d = tmp_path / "kv"

    def store(directory=d):
        return SessionStore(model, tok, config=CacheConfig(), total=10**8, directory=directory)

    first = store()
    with pytest.raises(InputError, match="in use by another mlxkv serve"):
        store()  # two servers never share one directory
    first.close()
    index = json.loads((d / "index.json").read_text())
    ours = index["model"]["name"]
    index["model"] = {**index["model"], "name": "other-model", "layers": 30}
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=f"model 'other-model' .*served here, '{ours}'"):
        store()
    (d / "index.json").write_text('{"format": "mlxkv-serve-ind')  # cut short
    s = store()
    assert not s.entries and (d / "index.json.damaged").exists()
    s.close()
    assert "its index cannot be read" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        store(tmp_path / "file")
    with pytest.raises(InputError, match="is not a writable directory"):
        store(tmp_path / "file" / "kv")
    # the command says so in one line before it loads a model
    r = subprocess.run([sys.executable, "-m", "mlxkv.cli", "serve", "--port", "0",
                        "--kv-dir", str(tmp_path / "file" / "kv")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--kv-dir" in r.stderr and "not a writable directory" in r.stderr
