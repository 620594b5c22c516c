"""The cache panel: KV bytes against the budget, per-layer token bars, the KV history,
speeds, and the model and cache settings. Fed ``mlxkv.CacheStats``; it reads nothing
from the cache itself."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Label, ProgressBar, Sparkline, Static

from mlxkv import CacheStats
from mlxkv.budget import format_bytes

BAR = 18
HISTORY = 2000  # samples kept for the sparkline


def layer_bar(seen: int, full: int, quantized: int, width: int = BAR) -> Content:
    """█ full precision, ▓ quantized, ░ evicted, as shares of the tokens seen."""
    if seen <= 0:
        return Content("·" * width)
    f = round(width * full / seen)
    q = min(round(width * quantized / seen), width - f)
    return Content.assemble(("█" * f, "$success"), ("▓" * q, "$warning"),
                            ("░" * (width - f - q), "$text-muted"))


def gauge_text(stats: CacheStats) -> str:
    if not stats.budget:
        return f"KV {format_bytes(stats.nbytes)} (no budget)"
    share = 100 * stats.nbytes / stats.budget
    return f"KV {format_bytes(stats.nbytes)} / {format_bytes(stats.budget)} ({share:.1f}%)"


class CachePanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Label("KV cache", classes="panel-title")
        yield Static(id="gauge-text", markup=False)
        yield ProgressBar(id="gauge", show_eta=False, show_percentage=False)
        yield Label("KV bytes over the conversation", classes="panel-label")
        yield Sparkline([], id="history")
        yield Static(id="figures", markup=False)
        yield Static(id="settings", markup=False)
        yield Label("Layers: █ full ▓ quantized ░ evicted", classes="panel-label")
        with VerticalScroll(id="layers-scroll"):
            yield Static(id="layers", markup=False)

    def on_mount(self) -> None:
        self.samples: list[float] = []
        self.stats: CacheStats | None = None

    def show_settings(self, model_name: str, cache_description: str) -> None:
        # one phrase of the description per line, so none is broken by wrapping
        phrases = "\n         ".join(cache_description.split(", "))
        self.query_one("#settings", Static).update(
            Content(f"model    {model_name}\ncache    {phrases}"))

    def show(self, stats: CacheStats, *, prefill_tps: float = 0.0, decode_tps: float = 0.0,
             record: bool = True) -> None:
        self.stats = stats
        self.query_one("#gauge-text", Static).update(Content(gauge_text(stats)))
        gauge = self.query_one("#gauge", ProgressBar)
        gauge.display = bool(stats.budget)
        if stats.budget:
            gauge.update(total=stats.budget, progress=stats.nbytes)
        if record:
            self.samples = (self.samples + [float(stats.nbytes)])[-HISTORY:]
            self.query_one("#history", Sparkline).data = self.samples
        quantized = {}
        for layer in stats.layers:
            for bits, n in layer.kept_quantized.items():
                quantized[bits] = max(quantized.get(bits, 0), n)
        kept = [f"{max((s.kept_full for s in stats.layers), default=0)} full"]
        kept += [f"{n} at {b}-bit" for b, n in sorted(quantized.items())]
        evicted = max((s.evicted for s in stats.layers), default=0)
        self.query_one("#figures", Static).update(Content(
            f"tokens   {stats.seen} seen · {stats.kept} kept · {evicted} evicted\n"
            f"kept     {' · '.join(kept)}\n"
            f"ratio    {stats.compression:.2f}x vs {stats.dtype} for the kept tokens\n"
            f"memory   {format_bytes(stats.used_nbytes)} in use · "
            f"{format_bytes(stats.nbytes)} allocated\n"
            f"tok/s    prefill {prefill_tps:.1f} · decode {decode_tps:.1f}"))
        lines = [Content.assemble(f"L{i:02} ", layer_bar(s.seen, s.kept_full,
                                                         sum(s.kept_quantized.values())),
                                  f" {format_bytes(s.nbytes)}")
                 for i, s in enumerate(stats.layers)]
        self.query_one("#layers", Static).update(Content("\n").join(lines))
