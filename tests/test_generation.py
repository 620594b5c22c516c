"""The decode loop on the real default model."""

import mlx.core as mx
import pytest

import mlxkv
from mlxkv.errors import InputError
from mlxkv.generation import _StopMatcher


def test_paris(smollm, paris_prompt):
    model, tok = smollm
    assert "Paris" in mlxkv.generate(model, tok, paris_prompt, max_tokens=24)


def test_stops_at_eos_with_reason_and_token(smollm, paris_prompt):
    model, tok = smollm
    events = list(mlxkv.stream_generate(model, tok, paris_prompt, max_tokens=64))
    last = events[-1]
    assert last.finish_reason == "eos"
    assert last.tokens[0] in tok.eos_token_ids
    assert last.generated_tokens < 64
    assert all(e.finish_reason is None for e in events[:-1])
    assert last.prefill_tps > 0 and last.decode_tps > 0
    assert last.cache.seen == last.prompt_tokens + last.generated_tokens


def test_max_tokens_and_stop_string(smollm, paris_prompt):
    model, tok = smollm
    events = list(mlxkv.stream_generate(model, tok, paris_prompt, max_tokens=3))
    assert events[-1].finish_reason == "length" and events[-1].generated_tokens == 3
    text = mlxkv.generate(model, tok, paris_prompt, max_tokens=24, stop=["France"])
    assert text == "The capital of "


def test_cancel(smollm, paris_prompt):
    model, tok = smollm
    events = list(mlxkv.stream_generate(model, tok, paris_prompt, max_tokens=24,
                                        should_stop=lambda: True))
    assert events[-1].finish_reason == "cancelled" and events[-1].generated_tokens == 1


def test_seeded_sampling_repeats(smollm, paris_prompt):
    model, tok = smollm
    a = mlxkv.generate(model, tok, paris_prompt, max_tokens=12, temp=1.0, top_p=0.9, seed=3)
    b = mlxkv.generate(model, tok, paris_prompt, max_tokens=12, temp=1.0, top_p=0.9, seed=3)
    assert a == b


@pytest.mark.parametrize("kwargs", [dict(temp=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(min_p=2), dict(repetition_penalty=0)])
def test_invalid_sampling(smollm, kwargs):
    model, tok = smollm
    with pytest.raises(InputError):
        next(mlxkv.stream_generate(model, tok, "hi", **kwargs))


def test_prompt_longer_than_context(smollm):
    model, tok = smollm
    limit = model.args.max_position_embeddings
    with pytest.raises(InputError, match="context"):
        next(mlxkv.stream_generate(model, tok, [5] * (limit + 1)))


def test_stop_matcher_holds_back_prefixes():
    m = _StopMatcher(["</end>"])
    assert m.feed("abc</") == ("abc", False)
    assert m.feed("en") == ("", False)
    assert m.feed("d>tail") == ("", True)
    m = _StopMatcher(["xy"])
    assert m.feed("ax") == ("a", False)
    assert m.feed("b") == ("xb", False)


def test_multi_turn_reuses_cache_and_matches_reprefill(smollm):
    model, tok = smollm
    chat = mlxkv.ChatSession(model, tok, max_tokens=24)
    first = chat.ask("What is the capital of France?")
    assert "Paris" in first
    held = chat.cache[0].offset
    second = chat.ask("And of Germany?")
    # Only the new turn was fed, not the history.
    assert chat.last_fed < 20 and chat.cache[0].offset > held
    # Same tokens as a fresh generation over the whole rendered history.
    prompt = tok.apply_chat_template(chat.messages[:-1], add_generation_prompt=True)
    assert mlxkv.generate(model, tok, prompt, max_tokens=24) == second


def test_chat_keeps_history_on_error(smollm):
    model, tok = smollm
    chat = mlxkv.ChatSession(model, tok, max_tokens=8)
    chat.ask("Hello")
    before = list(chat.messages)
    with pytest.raises(InputError):
        chat.ask("Hello again", temp=-1)
    assert chat.messages == before
    with pytest.raises(InputError):
        chat.ask("   ")
    assert chat.messages == before


def test_a_plain_question_is_answered_through_the_chat_template(smollm):
    """What a new user types first (README): a string prompt gets the model's chat
    template, as ``mlxkv generate`` gives it."""
    model, tok = smollm
    assert "Paris" in mlxkv.generate(model, tok, "What is the capital of France?")


def test_prompt_forms_give_the_tokens_a_user_means(smollm, paris_prompt):
    from mlxkv.generation import encode_prompt, prompt_tokens

    model, tok = smollm
    question = "What is the capital of France?"
    templated = prompt_tokens(tok, question)
    assert templated == encode_prompt(tok, paris_prompt)  # the CLI's rendering
    assert prompt_tokens(tok, [{"role": "user", "content": question}]) == templated
    assert prompt_tokens(tok, paris_prompt) == templated  # already rendered: not again
    assert prompt_tokens(tok, templated) == templated  # token ids as they are
    raw = prompt_tokens(tok, question, chat_template=False)
    assert raw == list(tok.encode(question)) and len(raw) < len(templated)
    with_system = prompt_tokens(tok, question, system="Answer in French.")
    assert tok.decode(with_system).count("Answer in French.") == 1
    for bad, needle in ((" ", "empty"), ([{"role": "user"}], "'content'"),
                        ([{"role": "user", "content": "hi"}, 5], "not a mix")):
        with pytest.raises(InputError, match=needle):
            prompt_tokens(tok, bad)
    with pytest.raises(InputError, match="system message"):
        prompt_tokens(tok, question, chat_template=False, system="x")
    with pytest.raises(InputError, match="not token ids"):
        prompt_tokens(tok, templated, system="x")
    with pytest.raises(InputError, match="give it once"):
        prompt_tokens(tok, [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
                      system="x")
