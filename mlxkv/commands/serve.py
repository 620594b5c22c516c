"""``mlxkv serve``: the OpenAI-compatible server (``mlxkv.server``), with the same model,
cache and sampling flags as ``mlxkv chat`` as its defaults."""

from __future__ import annotations

import os
import sys

from ..budget import format_bytes, parse_bytes
from ..errors import InputError
from .common import (add_cache_flags, add_model_flags, add_sampling_flags, chat_defaults,
                     load_for_args, sampling_from_args)


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible server (chat/completions, "
                                     "completions) keeping many conversations in one KV budget")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $MLXKV_API_KEY, or none)")
    s.add_argument("--kv-total", default="1GB", metavar="SIZE",
                   help="the most KV cache all conversations may hold in memory together; "
                        "beyond it the least recently used are saved to disk")
    s.add_argument("--kv-dir", default=None, metavar="DIR",
                   help="keep conversations across restarts: those saved to disk (and, when "
                        "the server stops, those in memory) go to DIR with an index, and the "
                        "next 'mlxkv serve --kv-dir DIR' of the same model continues them "
                        "(default: a temporary directory, removed when the server stops)")
    s.add_argument("--kv-disk", default="10GB", metavar="SIZE",
                   help="the most disk the saved conversations may take; beyond it the least "
                        "recently used are removed (their next request reads the history again)")
    s.add_argument("--max-body", default="8MB", metavar="SIZE", help="largest request body")
    add_model_flags(s)
    add_sampling_flags(s)
    add_cache_flags(s)
    s.set_defaults(func=run)


def run(args) -> int:
    from ..server import LOOPBACK, Service
    from ..server.disk import check_dir

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0-65535 (got {args.port})")
    if args.system is not None:
        raise InputError("mlxkv serve takes the system message from each request's messages "
                         "(no --system)")
    total, max_body = parse_bytes(args.kv_total), parse_bytes(args.max_body)
    disk_total = parse_bytes(args.kv_disk)
    if args.kv_dir is not None:
        check_dir(args.kv_dir)  # before the model loads (its index is read after)
    api_key = args.api_key or os.environ.get("MLXKV_API_KEY") or None
    sampling = sampling_from_args(args)
    model, tokenizer, resolved, config = load_for_args(args, defaults=chat_defaults(args))
    name = resolved.alias or resolved.path.name
    generation = dict(prefill_step=args.prefill_step, stop=args.stop, sampling=sampling)
    service = Service(model, tokenizer, name=name, aliases=(resolved.path.name,), config=config,
                      total=total, directory=args.kv_dir, disk_total=disk_total,
                      generation=generation,
                      max_tokens=args.max_tokens, sampling=sampling, api_key=api_key,
                      max_body=max_body, host=args.host, port=args.port)
    print(f"mlxkv serve: {name} at {service.url} (cache {service.store.config.describe()}; "
          f"all conversations within {format_bytes(total)}"
          f"{'; API key required' if api_key else ''}). Ctrl-C stops.", flush=True)
    if args.host not in LOOPBACK and api_key is None:
        print(f"mlxkv serve: warning: listening on {args.host} without --api-key: anyone who "
              "can reach this address can use the model", file=sys.stderr, flush=True)
    service.run()
    return 0
