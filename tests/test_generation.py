"""lorakit.generation: the one generation helper (sampling options, adapters per row, stop strings)."""

import pytest
import torch
from tiny import byte_tokenizer, randomize_lora, tiny_model, tiny_t5

import lorakit
from lorakit.generation import Sampling, cut_at_stop, generate


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
