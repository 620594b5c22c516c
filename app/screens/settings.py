"""The settings screen: the cache options of the slash commands, in a form."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

from mlxkv import CacheConfig, settings
from mlxkv.cache import codec
from mlxkv.errors import InputError
from mlxkv.policies import known_policies

BITS = [("full precision", 0)] + [(f"{b}-bit", b) for b in sorted(codec.BITS, reverse=True)]


class SettingsScreen(ModalScreen[CacheConfig | None]):
    """Returns the new config, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, config: CacheConfig):
        super().__init__()
        self.config = config

    def compose(self) -> ComposeResult:
        c = self.config
        with Vertical(id="settings-form"):
            yield Label("Cache settings", classes="panel-title")
            yield Label("Budget for the whole model's KV (e.g. 64MB; empty: none)")
            yield Input(str(c.budget or ""), id="budget")
            yield Label("Window: sinks + this many recent tokens (empty: none)")
            yield Input(str(c.window or ""), id="window")
            yield Label("Key bits")
            yield Select(BITS, value=c.key_bits or 0, allow_blank=False, id="key-bits")
            yield Label("Value bits")
            yield Select(BITS, value=c.value_bits or 0, allow_blank=False, id="value-bits")
            yield Label("Eviction policy")
            yield Select([(p, p) for p in known_policies()], value=c.policy_name,
                         allow_blank=False, id="policy")
            yield Label("", id="settings-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def read_form(self) -> CacheConfig:
        """The form's words, read by ``mlxkv.settings`` like the CLI's flags (empty: off)."""
        words = {name: self.query_one(f"#{name}", Input).value.strip() or "off"
                 for name in ("budget", "window")}
        if words["budget"] != "off" and words["window"] != "off":
            raise InputError("give a budget or a window, not both")
        for name in ("key_bits", "value_bits"):
            words[name] = self.query_one(f"#{name.replace('_', '-')}", Select).value or "off"
        chosen = self.query_one("#policy", Select).value
        # the same policy keeps its parameters (set with /kv policy snapkv:window=32)
        words["policy"] = self.config.policy if chosen == self.config.policy_name else chosen
        return settings.apply(self.config, words).check()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        try:
            self.dismiss(self.read_form())
        except InputError as e:
            self.query_one("#settings-error", Label).update(Content(str(e)))

    def action_cancel(self) -> None:
        self.dismiss(None)
