"""The conversation pane: user messages as plain text, replies as streamed Markdown."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Markdown, Static

from ..text import neutralize


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(Content(neutralize(text)), markup=False)
        self.text = text


class Note(Static):
    """A line from the app itself (errors, command results), never model output."""

    def __init__(self, text: str, *, error: bool = False):
        super().__init__(Content(text), markup=False, classes="error" if error else "")


class AssistantMessage(Markdown):
    """A reply. Model text is parsed as Markdown only (never as console markup), with
    terminal control characters made visible and links not followed."""

    def __init__(self, text: str = ""):
        super().__init__(neutralize(text), open_links=False)
        self.text = text  # the reply as the model wrote it (the app streams it in)


class Conversation(VerticalScroll):
    can_focus = False

    def add_user(self, text: str) -> UserMessage:
        return self._add(UserMessage(text))

    def add_assistant(self, text: str = "") -> AssistantMessage:
        return self._add(AssistantMessage(text))

    def add_note(self, text: str, *, error: bool = False) -> Note:
        return self._add(Note(text, error=error))

    def show_messages(self, messages: list[dict]) -> None:
        self.remove_children()
        for m in messages:
            if m["role"] == "user":
                self.add_user(m["content"])
            elif m["role"] == "assistant":
                self.add_assistant(m["content"])

    def _add(self, widget):
        self.mount(widget)
        self.scroll_end(animate=False)
        return widget
