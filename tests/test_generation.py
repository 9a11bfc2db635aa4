"""lorakit.generation: the one generation helper (sampling options, adapters per row, stop strings)."""

import pytest
import torch
from tiny import byte_tokenizer, randomize_lora, tiny_model, tiny_t5

import lorakit
from lorakit.generation import generate
from lorakit.sampling import Sampling, cut_at_stop


def test_sampling_options_map_to_generate_kwargs():
    assert Sampling(max_new_tokens=7).generate_kwargs() == {"max_new_tokens": 7, "do_sample": False}
    assert Sampling(temperature=0.5, top_p=0.9).generate_kwargs() == {
        "max_new_tokens": 256, "do_sample": True, "temperature": 0.5, "top_p": 0.9}
    assert Sampling(stop="###").stop == ("###",)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
])
def test_bad_sampling_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc###def!!", ["!!", "###"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_generate_equals_model_generate_per_row_adapter():
    tok = byte_tokenizer()
    model = tiny_model(tok)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="a")
    randomize_lora(model, "a", seed=3, std=0.5)
    model.eval()
    prompts = [[{"role": "user", "content": "hi there"}], [{"role": "user", "content": "yo"}]]
    got = generate(model, tok, prompts, Sampling(max_new_tokens=6), rows=["a", None])
    for prompt, row, text in zip(prompts, ["a", None], got):  # oracle: plain model.generate, one row alone
        enc = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), return_tensors="pt",
                  add_special_tokens=False)
        with lorakit.using(model, [row]), torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert got[0] != got[1]                                                  # the adapter changes the answer


def test_generate_on_t5_feeds_the_prompt_to_the_encoder():
    tok = byte_tokenizer(chat_template=None)
    model = tiny_t5(vocab=len(tok))
    text = generate(model, tok, ["translate: hello"], Sampling(max_new_tokens=4))[0]
    enc = tok(["translate: hello"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert text == tok.decode(out[0], skip_special_tokens=True).strip()


def _alone(model, tok, prompt, row, n):
    """Oracle: plain model.generate on one prompt with only its adapter, stopping at the engine's EOS ids."""
    from lorakit.engine import eos_ids

    enc = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), return_tensors="pt",
              add_special_tokens=False)
    with lorakit.using(model, [row]), torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=sorted(eos_ids(model, tok)))
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture
def with_adapters():
    tok = byte_tokenizer()
    model = tiny_model(tok)
    for name, seed in (("a", 3), ("b", 4)):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name=name)
        randomize_lora(model, name, seed=seed, std=0.5)
    return model.eval(), tok


def test_generate_runs_more_prompts_than_the_batch_each_as_if_alone(with_adapters):
    model, tok = with_adapters
    prompts = [[{"role": "user", "content": t}] for t in ("hi", "a longer question here", "yo", "blue", "red cat")]
    rows = ["a", None, "b", "b", "a"]
    got = generate(model, tok, prompts, Sampling(max_new_tokens=7), rows=rows, max_batch_size=2)
    assert got == [_alone(model, tok, p, r, 7) for p, r in zip(prompts, rows)]
    state = lorakit.state.get_state(model)
    assert state.routing is None and lorakit.active_adapters(model) == ["a"]   # the model is left as it was


def test_generate_seeds_row_i_with_seed_plus_i(with_adapters):
    model, tok = with_adapters
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    s = Sampling(max_new_tokens=8, temperature=1.0, seed=5)
    pair = generate(model, tok, prompts, s, rows="a")
    assert pair == generate(model, tok, prompts, s, rows="a")                 # same seed, same text
    assert pair[1] == generate(model, tok, prompts[1:], Sampling(max_new_tokens=8, temperature=1.0, seed=6),
                               rows="a")[0]


def test_generate_feeds_a_streamer_token_by_token(with_adapters):
    model, tok = with_adapters

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    rec = Recorder()
    prompt = [{"role": "user", "content": "hi"}]
    text, = generate(model, tok, [prompt], Sampling(max_new_tokens=5), rows="b", streamer=rec)
    ids = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert rec.calls[0] == [ids] and rec.calls[-1] == "end"                 # the prompt first, as model.generate
    new = [c[0][0] for c in rec.calls[1:-1]]
    assert len(new) == 5 and tok.decode(new, skip_special_tokens=True).strip() == text


@pytest.mark.parametrize("kwargs, message", [
    ({"rows": ["a"]}, "generate: 2 prompts but 1 adapter names in rows="),
    ({"streamer": object()}, "generate: a streamer takes one prompt at a time, got 2"),
])
def test_generate_refuses_mismatched_arguments(with_adapters, kwargs, message):
    model, tok = with_adapters
    with pytest.raises(ValueError, match=message):
        generate(model, tok, ["a", "b"], Sampling(max_new_tokens=2), **kwargs)
