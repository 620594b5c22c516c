"""The help screen: every key and every slash command."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.content import Content
from textual.widgets import Static

from ..commands import COMMANDS

KEYS = [
    ("Enter", "send the message"),
    ("Up / Down", "walk through the messages sent before"),
    ("Esc", "stop the reply (the part already written stays)"),
    ("ctrl+n", "new chat"),
    ("F1", "this help"),
    ("F2", "cache settings"),
    ("ctrl+q", "quit (the conversation is saved after every reply)"),
]


def help_text() -> str:
    lines = ["mlxkv chat", "", "Keys"]
    lines += [f"  {k:<12} {v}" for k, v in KEYS]
    lines += ["", "Commands"]
    for name, (usage, text) in COMMANDS.items():
        lines.append(f"  /{name + (' ' + usage if usage else ''):<16} {text}")
    lines += ["", "Changing the cache (/budget, /bits, /window, /policy, /kv, F2) rebuilds it",
              "from the conversation: nothing is lost.", "", "Esc, q or F1 closes this screen."]
    return "\n".join(lines)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static(Content(help_text()), markup=False)
