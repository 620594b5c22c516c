"""The chat app, headless (``App.run_test`` + Pilot) on the real default model, plus
snapshots of its screens and one run of the real ``mlxkv chat`` in tmux."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlxkv
from mlxkv import CacheConfig, ChatSession
from mlxkv_app import ChatApp
from mlxkv_app.commands import Command, cache_change, parse
from mlxkv_app.screens.help import HelpScreen
from mlxkv_app.screens.settings import SettingsScreen
from mlxkv_app.store import ChatStore
from mlxkv_app.text import neutralize
from mlxkv_app.widgets.cache_panel import CachePanel, gauge_text, layer_bar
from mlxkv_app.widgets.conversation import AssistantMessage, Note, UserMessage
from mlxkv.errors import InputError

BUDGET = CacheConfig(budget="16MB", key_bits=8, value_bits=8, group_size=32)
SIZE = (130, 40)


@pytest.fixture
def store(tmp_path):
    return ChatStore(tmp_path / "chats")


def make_app(smollm, store, config=BUDGET, max_tokens=32, **kwargs):
    model, tok = smollm
    session = ChatSession(model, tok, cache_config=config, max_tokens=max_tokens)
    return ChatApp(session, model_name="smollm2-135m", store=store, chat_name="test-chat",
                   **kwargs)


async def type_and_send(pilot, text):
    pilot.app.query_one("#prompt").value = text
    await pilot.press("enter")


async def wait_idle(pilot, seconds=120):
    deadline = time.monotonic() + seconds
    while pilot.app.busy and time.monotonic() < deadline:
        await pilot.pause(0.05)
    assert not pilot.app.busy, "the model did not finish in time"
    await pilot.pause(0.2)


def screen_text(app) -> str:
    """What the screen shows, as plain text lines."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


# -- pure parts -------------------------------------------------------------------------------
def test_neutralize_makes_controls_visible():
    assert neutralize("a\x1b[31mred\x07\r\n\tb\x9b") == "a\u241b[31mred\u2407\u240d\n\tb\ufffd"
    assert neutralize("[bold]x[/]") == "[bold]x[/]"


def test_commands_parse_and_change_the_config():
    assert parse("hello /budget") is None
    assert parse(" /budget 32MB ") == Command("budget", "32MB")
    with pytest.raises(InputError, match="unknown command /frob.*known: /budget"):
        parse("/frob")
    with pytest.raises(InputError, match="needs an argument"):
        parse("/budget")
    with pytest.raises(InputError, match="takes no argument"):
        parse("/clear now")
    c = cache_change(BUDGET, Command("budget", "32MB"))
    assert c.budget == 32_000_000 and c.key_bits == 8
    assert cache_change(c, Command("budget", "off")).budget is None
    with pytest.raises(InputError, match="cannot read '32 parsecs'"):
        cache_change(c, Command("budget", "32 parsecs"))
    w = cache_change(c, Command("window", "512"))
    assert w.window == 512 and w.budget is None
    off = cache_change(CacheConfig(key_bits=4, value_bits=4, residual=64), Command("bits", "off"))
    assert off.key_bits is None and off.residual == 0
    with pytest.raises(InputError, match="whole number"):
        cache_change(c, Command("bits", "four"))
    with pytest.raises(InputError, match="unknown policy 'nope' \\(known: window"):
        cache_change(c, Command("policy", "nope")).check()
    # /kv reaches every cache setting, as its --kv-* flag does
    r = cache_change(c, parse("/kv residual 64"))
    assert r.residual == 64 and r.budget == c.budget
    assert cache_change(c, parse("/kv policy snapkv:window=8")).policy == "snapkv:window=8"
    with pytest.raises(InputError, match="sets one of: bits, max-kv-size, key-bits"):
        parse("/kv")
    with pytest.raises(InputError, match="/kv residual needs a value"):
        cache_change(c, parse("/kv residual"))
    with pytest.raises(InputError, match="unknown cache setting 'frob'"):
        cache_change(c, parse("/kv frob 3"))


def test_layer_bar_shares():
    assert layer_bar(0, 0, 0, width=10).plain == "·" * 10
    assert layer_bar(100, 50, 25, width=8).plain == "████▓▓░░"
    assert layer_bar(7, 7, 0, width=5).plain == "█████"


def test_store_rejects_bad_names_and_damaged_files(store, smollm):
    with pytest.raises(InputError, match="not a usable chat name"):
        store.paths("../escape")
    with pytest.raises(InputError, match="no saved chat named 'missing'"):
        store.read("missing")
    store.root.mkdir(parents=True)
    (store.root / "bad.json").write_text("{not json")
    with pytest.raises(mlxkv.MlxkvError, match="cannot be read"):
        store.read("bad")


# -- the app on the real model -----------------------------------------------------------------
async def test_reply_streams_and_gauge_tells_the_truth(smollm, store):
    app = make_app(smollm, store, max_tokens=48)
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(CachePanel)
        start = panel.stats.nbytes
        await type_and_send(pilot, "What is the capital of France? Tell me about it.")
        while not app.busy:
            await pilot.pause(0.01)
        lengths = set()
        while app.busy:
            await pilot.pause(0.05)
            replies = list(app.query(AssistantMessage))
            if replies:
                lengths.add(len(replies[-1].text))
            assert panel.stats.nbytes <= 16_000_000
        await wait_idle(pilot)
        reply = list(app.query(AssistantMessage))[-1].text
        assert "Paris" in reply
        assert len(lengths - {0}) >= 2, "the reply did not stream in pieces"
        truth = mlxkv.cache_stats(app.session.cache)
        assert panel.stats.nbytes == truth.nbytes > start and panel.stats.budget == 16_000_000
        assert gauge_text(truth) in screen_text(app)
        assert len(panel.samples) >= 2
        assert app.session.messages[-1] == {"role": "assistant", "content": reply}
    saved = json.loads((store.root / "test-chat.json").read_text())
    assert saved["messages"] == app.session.messages


async def test_panel_ratio_and_settings_read_as_a_user_means(smollm, store):
    """Early in a chat the ratio compares the kept tokens with their uncompressed size (not
    the preallocated ring), and the settings keep each phrase on one line at 150 columns;
    the group size chosen for the model is shown."""
    config = CacheConfig(budget="16MB", key_bits=8, value_bits=8, residual=32)
    app = make_app(smollm, store, config=config, max_tokens=8)
    async with app.run_test(size=(150, 40)) as pilot:
        await type_and_send(pilot, "Hi!")
        await wait_idle(pilot)
        text = screen_text(app)
        stats = app.query_one(CachePanel).stats
        assert stats.used_nbytes < stats.nbytes  # the ring is allocated ahead of use
        assert stats.compression >= 1.0
        ratio = next(line for line in text.splitlines() if "ratio" in line)
        assert f"{stats.compression:.2f}x vs float32 for the kept tokens" in ratio
        description = app.session.cache_config.describe()
        assert "group 64" in description
        for phrase in description.split(", "):
            assert any(phrase in line for line in text.splitlines()), phrase


async def test_escape_stops_the_reply_and_keeps_it(smollm, store):
    app = make_app(smollm, store, max_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Write a long story about a dragon and a knight.")
        while not list(app.query(AssistantMessage)) or not app.query(AssistantMessage).last().text:
            await pilot.pause(0.05)
        await pilot.press("escape")
        await wait_idle(pilot, 60)
        partial = app.session.messages[-1]
        assert partial["role"] == "assistant" and partial["content"]
        assert app.session.cache[0].offset < 300
        assert any("(stopped)" in str(n.render()) for n in app.query(Note))


async def test_budget_command_rebuilds_and_keeps_history(smollm, store):
    app = make_app(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "What is the capital of France?")
        await wait_idle(pilot)
        messages = list(app.session.messages)
        await type_and_send(pilot, "/budget 8MB")
        await wait_idle(pilot)
        assert app.session.cache_config.budget == 8_000_000
        stats = app.query_one(CachePanel).stats
        assert stats.budget == 8_000_000 and 0 < stats.nbytes <= 8_000_000
        assert app.session.messages == messages and len(app.query(UserMessage)) == 1
        await type_and_send(pilot, "/budget 1KB")
        await wait_idle(pilot)
        assert app.session.cache_config.budget == 8_000_000
        assert "too small" in str(app.query(Note).last().render())
        await type_and_send(pilot, "/frobnicate")
        await pilot.pause(0.1)
        assert "unknown command /frobnicate" in str(app.query(Note).last().render())
        assert app.session.messages == messages


async def test_save_clear_load_resumes_the_compressed_cache(smollm, store):
    app = make_app(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "What is the capital of France?")
        await wait_idle(pilot)
        messages, tokens = list(app.session.messages), list(app.session.cached_tokens)
        await type_and_send(pilot, "/save paris")
        await wait_idle(pilot)
        await pilot.press("ctrl+n")
        await pilot.pause(0.1)
        assert app.session.messages == [] and not app.query(UserMessage)
        await type_and_send(pilot, "/load paris")
        await wait_idle(pilot)
        assert app.session.messages == messages and app.session.cached_tokens == tokens
        assert str(app.query(Note).last().render()) == "Opened paris"  # no rebuild
        assert app.chat_name == "paris" and len(app.query(UserMessage)) == 1
        # A damaged cache file: the chat still opens, rebuilt from its messages.
        (store.root / "paris.kv.safetensors").write_bytes(b"garbage")
        await type_and_send(pilot, "/load paris")
        await wait_idle(pilot)
        assert app.session.messages == messages
        assert "rebuilt the cache from the messages" in str(app.query(Note).last().render())


async def test_model_text_is_never_markup(smollm, store):
    hostile = "[bold]not bold[/] [/] \x1b[31mred\x1b[0m [link=x]y[/link]"
    doc = {"format": "mlxkv-chat-1", "model": "smollm2-135m", "system": None,
           "cache_config": BUDGET.to_dict(),
           "messages": [{"role": "user", "content": "[i]me[/i]"},
                        {"role": "assistant", "content": hostile}]}
    store.root.mkdir(parents=True)
    (store.root / "hostile.json").write_text(json.dumps(doc))
    app = make_app(smollm, store, resume="hostile")
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(pilot)
        text = screen_text(app)
        assert "[bold]not bold[/] [/]" in text and "\u241b[31mred\u241b[0m" in text
        assert "[link=x]y[/link]" in text and "[i]me[/i]" in text
        assert app.query(AssistantMessage).last().text == hostile


async def test_help_settings_and_history_keys(smollm, store):
    app = make_app(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.pause(0.2)
        text = screen_text(app)
        assert all(f"/{c}" in text for c in ("budget", "bits", "window", "policy", "save", "load"))
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("f2")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#budget").value = "12MB"
        await pilot.click("#apply")
        await wait_idle(pilot)
        assert app.session.cache_config.budget == 12_000_000
        await type_and_send(pilot, "/chats")
        await type_and_send(pilot, "/help")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("up")
        assert app.query_one("#prompt").value == "/help"
        await pilot.press("up")
        assert app.query_one("#prompt").value == "/chats"
        await pilot.press("down", "down")
        assert app.query_one("#prompt").value == ""


# -- snapshots ----------------------------------------------------------------------------------
def test_snapshot_main_screen(snap_compare, smollm, store):
    assert snap_compare(make_app(smollm, store), terminal_size=SIZE)


def test_snapshot_help_screen(snap_compare, smollm, store):
    assert snap_compare(make_app(smollm, store), press=["f1"], terminal_size=SIZE)


# -- the real command in a real terminal --------------------------------------------------------
def _tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_mlxkv_chat_in_tmux(smollm, tmp_path):
    session = f"mlxkv-test-{os.getpid()}"
    exe = Path(sys.executable).parent / "mlxkv"
    env = [f"MLXKV_DATA_DIR={tmp_path}", "TERM=xterm-256color"]
    for var in ("MLXKV_CACHE_DIR", "XDG_CACHE_HOME", "HOME", "PATH"):
        if os.environ.get(var):
            env.append(f"{var}={os.environ[var]}")
    flags = [a for e in env for a in ("-e", e)]
    r = _tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", *flags,
              f"{exe} chat --max-tokens 32")
    assert r.returncode == 0, r.stderr

    def screen():
        return _tmux("capture-pane", "-p", "-t", session).stdout

    def wait_for(needle, seconds=180):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if needle in (text := screen()):
                return text
            time.sleep(0.3)
        raise AssertionError(f"{needle!r} never appeared:\n{screen()}")

    try:
        wait_for("/ 64.0 MB")
        _tmux("send-keys", "-t", session, "What is the capital of France?", "Enter")
        text = wait_for("Paris")
        assert "mlxkv chat" in text and "KV cache" in text
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("chats/*.json")) and time.monotonic() < deadline:
            time.sleep(0.3)
        saved = json.loads(next(tmp_path.glob("chats/*.json")).read_text())
        assert "Paris" in saved["messages"][-1]["content"]
        _tmux("send-keys", "-t", session, "C-q")
        deadline = time.monotonic() + 20
        while _tmux("has-session", "-t", session).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _tmux("has-session", "-t", session).returncode != 0, "the app did not quit"
    finally:
        _tmux("kill-session", "-t", session)
