"""training.evaluate.exact_match: greedy answers on the engine, one continuous batch over every prompt."""

import json

import torch
from tiny import byte_tokenizer, tiny_model

from lorakit.engine import eos_ids
from lorakit.training.evaluate import exact_match


def test_exact_match_scores_greedy_answers_each_as_if_alone(tmp_path):
    tok = byte_tokenizer()
    model = tiny_model(tok).eval()
    questions = ["red", "blue cat", "sun", "green dog sun", "cat", "dog", "blue"]
    answers = []
    for q in questions:                                              # oracle: model.generate on each alone
        enc = tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                  return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(eos_ids(model, tok)))
        answers.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    refs = [a if i in (1, 4) else "something else" for i, a in enumerate(answers)]  # two rows right
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": r}]}) + "\n"
                            for q, r in zip(questions, refs)))
    model.train()
    result = exact_match(model, tok, str(path), max_new_tokens=6, batch_size=3)
    assert result["predictions"] == answers
    assert result["exact_match"] == 2 / 7 and result["n"] == 7
    assert model.training                                            # the caller's mode is restored


def test_generation_stops_where_no_answer_could_still_match(tmp_path, monkeypatch):
    from lorakit.training import evaluate

    tok = byte_tokenizer()
    model = tiny_model(tok).eval()
    questions = ["red", "blue cat", "sun", "green dog sun"]
    path = tmp_path / "eval.jsonl"

    def score(refs, margin):
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": r}]}) + "\n"
                                for q, r in zip(questions, refs)))
        monkeypatch.setattr(evaluate, "MATCH_MARGIN", margin)
        result = exact_match(model, tok, str(path), max_new_tokens=30)
        budgets.append(sampled[-1].max_new_tokens)
        return result

    sampled, budgets = [], []
    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda m, t, p, sampling, **kw: sampled.append(sampling) or
                        real(m, t, p, sampling, **kw))

    free = score(["x"] * 4, 1000)                                    # no cap: up to 30 new tokens a row
    refs = [free["predictions"][0][:3], "ab", free["predictions"][2][:3], "abcd"]  # byte tokens: 4 at most
    capped, uncapped = score(refs, 2), score(refs, 1000)
    longest = max(len(tok(r)["input_ids"]) for r in refs)
    assert budgets == [30, longest + 2, 30]                          # the longest reference + the margin
    for short, full in zip(capped["predictions"], uncapped["predictions"]):
        assert full.startswith(short) and len(short) < len(full)    # the cut only shortens what runs on
    assert capped["exact_match"] == uncapped["exact_match"]
