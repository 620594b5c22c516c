"""The mlxkv chat app: a conversation pane and a live KV-cache panel.

All model work (replies, cache rebuilds, saves and loads) runs in one worker thread
at a time; it posts messages, and the UI folds them in on a timer so a fast stream
never floods the screen.

Over 300 lines on purpose: this is the one module that wires the panes, the worker's
messages and the key bindings together; widgets, screens, slash commands (``commands.py``)
and saved chats (``store.py``) live in their own modules."""

from __future__ import annotations

import threading

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer, Header, Markdown, ProgressBar

from mlxkv import CacheConfig, ChatSession, GenerationEvent, cache_stats
from mlxkv.errors import InputError, MlxkvError

from . import commands
from .screens.help import HelpScreen
from .screens.settings import SettingsScreen
from .store import ChatStore, new_name
from .text import neutralize
from .widgets.cache_panel import CachePanel
from .widgets.conversation import AssistantMessage, Conversation
from .widgets.prompt import PromptInput


class Streamed(Message):
    def __init__(self, event: GenerationEvent):
        super().__init__()
        self.event = event


class ReplyEnded(Message):
    def __init__(self, event: GenerationEvent | None, error: str | None, saved: str | None):
        super().__init__()
        self.event, self.error, self.saved = event, error, saved


class Progress(Message):
    def __init__(self, done: int, total: int):
        super().__init__()
        self.done, self.total = done, total


class JobDone(Message):
    """A cache rebuild, save or load finished (``session`` set when it replaces the chat)."""

    def __init__(self, note: str | None, error: str | None = None,
                 session: ChatSession | None = None, name: str | None = None):
        super().__init__()
        self.note, self.error, self.session, self.name = note, error, session, name


class ChatApp(App):
    CSS_PATH = "mlxkv.tcss"
    TITLE = "mlxkv chat"
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("f1", "help", "Help"),
        Binding("f2", "settings", "Settings"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, session: ChatSession, *, model_name: str, store: ChatStore | None = None,
                 chat_name: str | None = None, resume: str | None = None,
                 autosave: bool = True, flush_interval: float = 0.1):
        super().__init__()
        self.session = session
        self.model_name = model_name
        self.store = store or ChatStore()
        self.chat_name = chat_name or new_name()
        self.resume = resume
        self.autosave = autosave
        self.flush_interval = flush_interval
        self.busy = False
        self._stop = threading.Event()
        self._reply: AssistantMessage | None = None
        self._stream = None  # Markdown.get_stream of the reply: Textual batches its fragments
        self._latest: GenerationEvent | None = None
        self._dirty = False

    # -- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield Conversation(id="conversation")
                yield ProgressBar(id="rebuild", show_eta=False)
                yield PromptInput(id="prompt")
            yield CachePanel(id="cache")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.chat_name
        self.query_one("#rebuild", ProgressBar).display = False
        self.show_cache(record=False)
        self.set_interval(self.flush_interval, self.flush)
        self.query_one(PromptInput).focus()
        if self.resume:
            self.start_job(self._load_job, self.resume)

    @property
    def conversation(self) -> Conversation:
        return self.query_one(Conversation)

    @property
    def panel(self) -> CachePanel:
        return self.query_one(CachePanel)

    def show_cache(self, record: bool = True) -> None:
        self.panel.show_settings(self.model_name, self.session.cache_config.describe())
        speeds = {}
        if self._latest is not None:
            speeds = dict(prefill_tps=self._latest.prefill_tps, decode_tps=self._latest.decode_tps)
        self.panel.show(cache_stats(self.session.cache), record=record, **speeds)

    def note(self, text: str, *, error: bool = False) -> None:
        self.conversation.add_note(text, error=error)

    # -- input ------------------------------------------------------------------------------
    @on(PromptInput.Submitted)
    def submitted(self, event: PromptInput.Submitted) -> None:
        text = event.value
        prompt = self.query_one(PromptInput)
        if not text.strip():
            return
        if self.busy:
            self.notify("The model is busy: wait, or press Esc to stop the reply.",
                        severity="warning")
            return
        prompt.remember(text)
        prompt.clear()
        try:
            command = commands.parse(text)
            if command is None:
                self.send(text)
            else:
                self.run_command(command)
        except InputError as e:
            self.note(str(e), error=True)

    def send(self, text: str) -> None:
        self.conversation.add_user(text)
        self._reply = self.conversation.add_assistant()
        self._stream = Markdown.get_stream(self._reply)
        self._stop.clear()
        self.busy = True
        self._generate(text)

    def run_command(self, command: commands.Command) -> None:
        name, arg = command.name, command.arg
        if name in commands.CACHE_COMMANDS:
            self.change_cache(commands.cache_change(self.session.cache_config, command))
        elif name == "clear":
            self.action_new_chat()
        elif name == "help":
            self.action_help()
        elif name == "save":
            self.store.check_name(arg)
            self.start_job(self._save_job, arg)
        elif name == "load":
            self.store.check_name(arg)
            self.start_job(self._load_job, arg)
        elif name == "chats":
            names = self.store.names()
            self.note("Saved chats: " + (", ".join(names) if names else "none yet"))

    def change_cache(self, config: CacheConfig) -> None:
        if config == self.session.cache_config:
            self.note(f"The cache is already: {config.describe()}")
            return
        self.start_job(self._rebuild_job, config)

    def start_job(self, job, *args) -> None:
        self.busy = True
        bar = self.query_one("#rebuild", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = True
        job(*args)

    # -- actions ----------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.busy and self._reply is not None:
            self._stop.set()

    def action_new_chat(self) -> None:
        if self.busy:
            self.notify("Wait for the model to finish (Esc stops a reply).", severity="warning")
            return
        self.session.reset()
        self.chat_name = self.sub_title = new_name()
        self.conversation.remove_children()
        self._latest = None
        self.show_cache()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_settings(self) -> None:
        if self.busy:
            self.notify("Wait for the model to finish.", severity="warning")
            return

        def chosen(config: CacheConfig | None) -> None:
            if config is not None:
                self.change_cache(config)

        self.push_screen(SettingsScreen(self.session.cache_config), chosen)

    # -- workers (one at a time: ``busy`` guards them) ----------------------------------------
    @work(thread=True, group="model")
    def _generate(self, text: str) -> None:
        last, error = None, None
        try:
            for event in self.session.send(text, should_stop=self._stop.is_set):
                last = event
                self.post_message(Streamed(event))
        except MlxkvError as e:
            error = str(e)
        self.post_message(ReplyEnded(last, error, self._autosave()))

    def _autosave(self) -> str | None:
        """Save after a reply; returns a problem to show, if any."""
        if not (self.autosave and self.session.messages):
            return None
        try:
            self.store.save(self.chat_name, self.session, model_name=self.model_name)
        except (OSError, MlxkvError) as e:
            return f"could not save the chat: {e}"
        return None

    def _progress(self, done: int, total: int) -> None:
        self.post_message(Progress(done, total))

    @work(thread=True, group="model")
    def _rebuild_job(self, config: CacheConfig) -> None:
        try:
            self.session.reconfigure(config, progress=self._progress)
        except MlxkvError as e:
            self.post_message(JobDone(None, error=f"cache unchanged: {e}"))
            return
        saved = self._autosave()
        self.post_message(JobDone(f"Cache is now: {self.session.cache_config.describe()}",
                                  error=saved))

    @work(thread=True, group="model")
    def _save_job(self, name: str) -> None:
        try:
            self.store.save(name, self.session, model_name=self.model_name)
        except (OSError, MlxkvError) as e:
            self.post_message(JobDone(None, error=f"could not save the chat: {e}"))
            return
        self.post_message(JobDone(f"Saved as {name}", name=name))

    @work(thread=True, group="model")
    def _load_job(self, name: str) -> None:
        try:
            session, why = self.store.load(name, self.session.model, self.session.tokenizer,
                                           progress=self._progress, **self.session.generation)
        except MlxkvError as e:
            self.post_message(JobDone(None, error=str(e)))
            return
        self.post_message(JobDone(f"Opened {name}" + (f": {why}" if why else ""),
                                  session=session, name=name))

    # -- messages from the workers --------------------------------------------------------------
    @on(Streamed)
    async def streamed(self, message: Streamed) -> None:
        self._latest = message.event
        self._dirty = True
        if self._reply is not None and self._stream is not None and message.event.text:
            self._reply.text += message.event.text
            await self._stream.write(neutralize(message.event.text))
            self.conversation.scroll_end(animate=False)

    def flush(self) -> None:
        """The panel, on a timer: figures of the latest token, not of every token."""
        if not self._dirty:
            return
        self._dirty = False
        if self._latest is not None:
            self.panel.show(self._latest.cache, prefill_tps=self._latest.prefill_tps,
                            decode_tps=self._latest.decode_tps)

    @on(ReplyEnded)
    async def reply_ended(self, message: ReplyEnded) -> None:
        if self._stream is not None:
            await self._stream.stop()  # the fragments still queued are written first
            self._stream = None
        self.flush()
        reply, self._reply = self._reply, None
        self.busy = False
        if message.error:
            if reply is not None and not reply.text:
                reply.remove()
            self.note(message.error, error=True)
        elif message.event is not None and message.event.finish_reason == "cancelled":
            self.note("(stopped)")
        if message.saved:
            self.note(message.saved, error=True)
        self.show_cache()

    @on(Progress)
    def progressed(self, message: Progress) -> None:
        self.query_one("#rebuild", ProgressBar).update(total=message.total, progress=message.done)

    @on(JobDone)
    def job_done(self, message: JobDone) -> None:
        self.busy = False
        self.query_one("#rebuild", ProgressBar).display = False
        if message.session is not None:
            self.session = message.session
            self.conversation.show_messages(self.session.messages)
            self._latest = None
        if message.name is not None:
            self.chat_name = self.sub_title = message.name
        if message.note:
            self.note(message.note)
        if message.error:
            self.note(message.error, error=True)
        self.show_cache()
