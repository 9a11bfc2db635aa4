"""lorakit.data: reading, shapes, encoding, dataset stats, batching, collation, preview.

Runs on a byte-level tokenizer built here (one token per byte, no merges), so every length below
is arithmetic on the strings. Real chat templates are tested in test_chat.py.
"""

import json
import statistics

import pytest
import torch
from tiny import CHATML, byte_tokenizer

from lorakit.training import datasets as data
from lorakit.training.datasets import (
    SHAPES,
    Encoded,
    build_dataset,
    detect_shape,
    encode_classification,
    encode_prompt_completion,
    encode_seq2seq,
    encode_text,
    load_rows,
    preview,
    to_messages,
)

USER_HEAD, END, ASSISTANT_HEAD = 6, 2, 11  # "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def trained_text(tok, e: Encoded) -> str:
    return tok.decode([t for t in e.labels if t != -100])


# ------------------------------------------------------------------------------------------ load_rows
def test_load_rows_reads_every_format(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    write_jsonl(tmp_path / "lines.json", rows)  # JSON Lines saved as .json
    (tmp_path / "d.csv").write_text("text,label\na,1\nb,0\n")
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "list.json", "wrapped.json", "lines.json", "d.parquet"):
        assert load_rows(tmp_path / name) == rows, name
    assert load_rows(tmp_path / "d.csv") == [{"text": "a", "label": "1"}, {"text": "b", "label": "0"}]


def test_load_rows_skips_blank_jsonl_lines(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert load_rows(tmp_path / "d.jsonl") == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize("name, content, message", [
    ("data.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n',
     "data.jsonl line 3: not valid JSON (Expecting value at column 10)"),
    ("data.jsonl", '{"text": "a"}\n["a", "list"]\n', "data.jsonl line 2: expected an object with named fields, got list"),
    ("data.json", '{"rows": []}', 'data.json: expected a list of rows or {"data": [...]}, got an object with keys [\'rows\']'),
    ("data.json", '[{"text": "a"},\n {"text": }]', "data.json line 2: not valid JSON"),
    ("data.csv", "text,label\na,1,extra\n", "data.csv line 2: more fields than the header's 2"),
    ("data.txt", "hello", "data.txt: unsupported dataset format '.txt'; use .jsonl, .json, .csv or .parquet"),
    ("data.parquet", "not parquet", "data.parquet: not a readable Parquet file"),
])
def test_load_rows_errors_name_the_file_and_line(tmp_path, monkeypatch, name, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as err:
        load_rows(name)
    assert str(err.value).startswith(message)


def test_load_rows_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset file '.*nope\.jsonl' does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_rows(tmp_path)


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("row, shape", [
    (qa("q", "a"), "messages"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "conversations"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"instruction": "i", "input": "x", "output": "o", "id": 7}, "alpaca"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"text": "t"}, "text"),
    ({"text": "t", "label": "pos"}, "classification"),
    ({"source": "s", "target": "t"}, "seq2seq"),
])
def test_detect_shape(row, shape):
    assert detect_shape(row, "x") == shape


def test_detect_shape_error_names_where_keys_and_shapes():
    with pytest.raises(ValueError) as err:
        detect_shape({"question": "q", "answer": "a"}, "train.jsonl line 17")
    msg = str(err.value)
    assert msg.startswith("train.jsonl line 17: the row fits none of the accepted shapes; it has keys ['answer', 'question']")
    for shape in SHAPES:
        assert f"\n  {shape}: {{" in msg


def test_to_messages_normalises_every_chat_shape():
    user_assistant = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_messages(qa("q", "a"), "messages") == user_assistant
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}]}
    assert to_messages(sharegpt, "conversations") == [{"role": "system", "content": "s"}] + user_assistant
    assert to_messages({"prompt": "q", "completion": "a"}, "prompt_completion") == user_assistant
    conversational = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    assert to_messages(conversational, "prompt_completion") == user_assistant
    assert to_messages({"instruction": "q", "input": "", "output": "a"}, "alpaca") == user_assistant
    assert to_messages({"instruction": "Add", "input": "2+2", "output": 4, "system": "s"}, "alpaca") == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("row, shape, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages",
     "d.jsonl line 3: unknown role 'robot'; use one of ('system', 'user', 'assistant')"),
    ({"messages": [{"role": "user"}]}, "messages", "d.jsonl line 3: a turn has no 'content' (it has keys ['role'])"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages",
     "d.jsonl line 3: a user message's content must be a string, got list"),
    ({"messages": "hi"}, "messages", "d.jsonl line 3: 'messages' must be a list of objects, got str"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations", "d.jsonl line 3: unknown speaker 'bot'"),
    ({"text": "t"}, "text", "d.jsonl line 3: shape 'text' is not a chat shape"),
])
def test_to_messages_errors(row, shape, message):
    with pytest.raises(ValueError) as err:
        to_messages(row, shape, "d.jsonl line 3")
    assert str(err.value).startswith(message)


# -------------------------------------------------------------------------------------- encoding
def test_encode_chat_labels_exactly_the_assistant_tokens(tok):
    e = data.encode_chat(to_messages(qa("Hi?", "Hello."), "messages"), tok, 1024)
    start = USER_HEAD + 3 + END + ASSISTANT_HEAD  # 22: the first token of "Hello."
    assert len(e.input_ids) == start + 6 + END
    assert e.labels == [-100] * start + e.input_ids[start:start + 7] + [-100]  # "Hello." + <|im_end|>, not "\n"
    assert trained_text(tok, e) == "Hello.<|im_end|>"
    assert (e.truncated, e.answer_lost, e.answer_start, e.n_trained) == (False, False, start, 7)


def test_encode_text_trains_every_token_and_appends_eos(tok):
    e = encode_text("abc", tok, 1024)
    assert e.input_ids == tok("abc")["input_ids"] + [tok.eos_token_id]
    assert e.labels == e.input_ids and e.n_trained == 3  # position 0 is never predicted
    cut = encode_text("abcdef", tok, 4)
    assert cut.input_ids == tok("abcd")["input_ids"] and cut.truncated and not cut.answer_lost


def test_encode_prompt_completion_without_template(tok):
    e = encode_prompt_completion("2+2=", "4", tok, 1024)
    assert e.labels == [-100] * 4 + [tok.convert_tokens_to_ids("4"), tok.eos_token_id]


def test_encode_classification_and_seq2seq(tok):
    e = encode_classification("good", "pos", tok, 3, {"neg": 0, "pos": 1})
    assert (e.input_ids, e.labels, e.truncated, e.task) == (tok("goo")["input_ids"], 1, True, "seq_cls")
    assert encode_classification("good", 1, tok, 8, None).labels == 1
    with pytest.raises(ValueError, match=r"label 'meh' is not one of the known labels \['neg', 'pos'\]"):
        encode_classification("good", "meh", tok, 8, {"neg": 0, "pos": 1})
    s = encode_seq2seq("source", "tgt", tok, 1024)
    assert s.input_ids == tok("source")["input_ids"] and s.labels == tok("tgt")["input_ids"] + [tok.eos_token_id]
    assert s.n_trained == 4 and s.task == "seq2seq"


# --------------------------------------------------------------------------------------- dataset
def test_build_dataset_counts_truncated_and_dropped_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [
        qa("a" * 10, "b" * 10),  # answer starts at 29, ends at 40: fits 48
        qa("a" * 25, "b" * 10),  # answer starts at 44: partly cut at 48 -> truncated, kept
        qa("a" * 40, "b" * 10),  # answer starts at 59: wholly cut -> dropped
    ])
    ds = build_dataset([path], tok, max_length=48)
    assert (ds.n_rows, len(ds), ds.n_truncated, ds.n_answer_lost) == (3, 2, 1, 1)
    assert ds.n_trained_tokens == 11 + 4  # all of "bbbbbbbbbb<|im_end|>", then "bbbb"
    assert trained_text(tok, ds[1]) == "bbbb" and ds[1].truncated
    assert ds.shapes == {"messages": 3}
    assert ds.warnings == [
        f"1 of 3 rows have no trained token and were dropped: 1 rows: the answer starts after --max-length 48 "
        f"(median prompt length 59 tokens); raise --max-length",
        "1 of 3 rows were cut at --max-length 48; the end of their answer is not trained",
    ]


def test_build_dataset_all_rows_masked_says_why(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [qa("a" * n, "b") for n in (40, 50, 60)])
    with pytest.raises(ValueError) as err:
        build_dataset(path, tok, max_length=32)
    assert str(err.value) == (
        f"all 3 rows of {path} have no trained token: the answer starts after --max-length 32 "
        f"(median prompt length {50 + 19} tokens); raise --max-length")


def test_build_dataset_rows_without_an_answer(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match="have no trained token: there is nothing to train on"):
        build_dataset(path, tok)


def test_build_dataset_bad_row_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [qa("q", "a"), {"question": "q"}])
    with pytest.raises(ValueError, match=r"t\.jsonl line 2: the row fits none .* it has keys \['question'\]"):
        build_dataset(path, tok)


def test_build_dataset_rejects_shapes_of_another_task(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}])
    with pytest.raises(ValueError, match=r"t\.jsonl line 1: a classification row cannot train task 'causal_lm'.*'seq_cls'"):
        build_dataset(path, tok)
    with pytest.raises(ValueError, match="task='sft' is not one of"):
        build_dataset(path, tok, task="sft")


def test_build_dataset_template_error_names_the_row(tmp_path):
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    strict = byte_tokenizer(no_system + CHATML)
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "system", "content": "s"}, *qa("q", "a")["messages"]]}])
    with pytest.raises(ValueError, match=r"t\.jsonl line 1: System role not supported"):
        build_dataset(path, strict)


def test_build_dataset_mixes_shapes_and_files(tmp_path, tok):
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a2"}]}
    a = write_jsonl(tmp_path / "a.jsonl", [qa("q", "a1"), sharegpt])
    (tmp_path / "b.csv").write_text("instruction,input,output\nq,,a3\n")
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "completion": "a4"}, {"text": "plain"}])
    ds = build_dataset([a, str(tmp_path / "b.csv"), c], tok)
    assert [trained_text(tok, e) for e in ds.rows[:4]] == [f"a{i}<|im_end|>" for i in range(1, 5)]
    assert trained_text(tok, ds[4]) == "plain<|im_end|>"
    assert ds.shapes == {"messages": 1, "conversations": 1, "alpaca": 1, "prompt_completion": 1, "text": 1}


def test_build_dataset_prompt_completion_without_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    ds = build_dataset(path, byte_tokenizer(chat_template=None))
    assert trained_text(byte_tokenizer(None), ds[0]) == "4<|im_end|>"
    chat = write_jsonl(tmp_path / "chat.jsonl", [qa("q", "a")])
    with pytest.raises(ValueError, match=r"chat\.jsonl line 1: tokenizer .* has no chat template"):
        build_dataset(chat, byte_tokenizer(chat_template=None))


def test_build_dataset_classification_label_ids(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    ds = build_dataset(path, tok, task="seq_cls")
    assert ds.label2id == {"neg": 0, "pos": 1} and [e.labels for e in ds] == [1, 0]
    (tmp_path / "n.csv").write_text("text,label\nx,1\ny,0\nz,2\n")
    assert build_dataset(str(tmp_path / "n.csv"), tok, task="seq_cls").label2id == {"0": 0, "1": 1, "2": 2}
    assert data._make_label2id([3, 7]) == {"3": 0, "7": 1}
    with pytest.raises(ValueError, match=r"t\.jsonl line 1: label 'pos' is not one of the known labels \['a', 'b'\]"):
        build_dataset(path, tok, task="seq_cls", label2id={"a": 0, "b": 1})


def test_build_dataset_seq2seq_takes_source_target_and_prompt_completion(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"source": "abc", "target": "xy"}, {"prompt": "p", "completion": "c"}])
    ds = build_dataset(path, tok, task="seq2seq")
    assert [tok.decode(e.labels) for e in ds] == ["xy<|im_end|>", "c<|im_end|>"]
    assert ds.n_trained_tokens == 3 + 2


# --------------------------------------------------------------------------------------- preview
def test_preview_marks_trained_tokens(tmp_path, tok):
    ds = build_dataset(write_jsonl(tmp_path / "t.jsonl", [qa("Hi?", "Hello.")]), tok)
    plain = preview(ds, tok, color=False)
    assert "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n[[Hello.<|im_end|>]]\n" in plain
    assert plain.startswith(ds.summary()) and "--- row 1: 30 tokens, 7 trained" in plain
    assert "\x1b[1;32mHello.<|im_end|>\x1b[0m" in preview(ds, tok, color=True)
    cls = build_dataset(write_jsonl(tmp_path / "c.jsonl", [{"text": "nice", "label": "pos"}]), tok, task="seq_cls")
    assert preview(cls, tok, color=False).endswith("nice\n=> [[pos]]")
