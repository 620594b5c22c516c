"""Run under ``mlx.launch`` (or alone, as the reference): greedy tokens and cache figures
of a model split over the group, for the configs the tensor-parallel tests compare; or
(``resume``) a conversation saved and resumed in the group. Rank 0 prints JSON."""

import json
import os
import sys

import mlxkv
from mlxkv import distributed
from mlxkv.cache.config import CacheConfig
from mlxkv.cache.make import make_cache
from mlxkv.chat import ChatSession
from mlxkv.generation import chat_tokens, stream_generate

TEXT = ("Once upon a time a fox lived at the edge of a wood. Every morning it walked to the "
        "river, drank, looked at the hills and went home. One day a crow sat on the fence and "
        "asked the fox where the river went. ") * 3 + "Where did the river go?"


def greedy(model, tok, budget: int, tokens: int) -> dict:
    """Greedy tokens and cache figures for full, 4-bit and snapkv-in-a-budget caches."""
    configs = {"full": {}, "4-bit": dict(key_bits=4, value_bits=4),
               "snapkv": dict(key_bits=4, value_bits=4, budget=budget, policy="snapkv")}
    prompt = chat_tokens(tok, [{"role": "user", "content": TEXT}])
    out = {}
    for name, words in configs.items():
        cache = make_cache(model, CacheConfig(**words))
        events = list(stream_generate(model, tok, prompt, cache=cache, max_tokens=tokens))
        st = events[-1].cache
        out[name] = {"tokens": [t for e in events for t in e.tokens], "nbytes": st.nbytes,
                     "budget": st.budget, "seen": st.seen, "kept": st.kept,
                     "ranks": [[r.nbytes, r.budget] for r in st.ranks]}
    return out


def main(model_name: str, mode: str, budget: int) -> None:
    group = distributed.init()
    model, tok = mlxkv.load(model_name, group=group)
    out = {"size": group.size}
    if mode == "greedy":
        out.update(greedy(model, tok, budget, int(os.environ.get("TP_TOKENS", "16"))))
    else:  # resume: save a conversation, resume it, both go on alike
        path = sys.argv[4]
        config = CacheConfig(key_bits=4, value_bits=4, budget=budget)
        first = ChatSession(model, tok, cache_config=config, max_tokens=8)
        first.ask(TEXT)
        first.save(path)
        again = ChatSession.resume(path, model, tok, max_tokens=8)
        out.update(note=again.resume_note, first=first.ask("And then?"), again=again.ask("And then?"))
    if group.leader:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
