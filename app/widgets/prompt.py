"""The message box: Enter sends, up/down walk through what was sent before."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input


class PromptInput(Input):
    BINDINGS = [
        Binding("up", "history(-1)", "Previous", show=False),
        Binding("down", "history(1)", "Next", show=False),
    ]

    def __init__(self, **kwargs):
        super().__init__(placeholder="Message, or /help", **kwargs)
        self.history: list[str] = []
        self._at = 0
        self._draft = ""

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._at = len(self.history)
        self._draft = ""

    def action_history(self, step: int) -> None:
        if not self.history:
            return
        if self._at == len(self.history):
            self._draft = self.value
        self._at = min(max(self._at + step, 0), len(self.history))
        self.value = self.history[self._at] if self._at < len(self.history) else self._draft
        self.cursor_position = len(self.value)
