"""`lorakit data` (the same as `lorakit sft --dry-run`): the summary once, then a few rows with the
trained tokens marked; nothing trained, nothing written."""

import re

from tiny import write_chat

from lorakit.cli import main
from lorakit.models import load_tokenizer
from lorakit.training.datasets import build_dataset


def test_data_prints_its_summary_once(base_dir, tmp_path, capsys):
    data = write_chat(tmp_path / "d.jsonl", n=12)
    assert main(["data", "--model", str(base_dir), "--dataset", data, "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    summary = build_dataset([data], load_tokenizer(str(base_dir))).summary()
    assert summary.startswith("12 rows from") and out.count(summary) == 1 and out.count("12 rows from") == 1
    assert len(re.findall(r"^--- row \d", out, flags=re.M)) == 3
    assert not (tmp_path / "run").exists()


def test_system_prompt_goes_before_chat_rows_without_one(base_dir, tmp_path, capsys):
    data = write_chat(tmp_path / "d.jsonl", n=4)
    assert main(["data", "--model", str(base_dir), "--dataset", data, "--system", "Answer in capitals."]) == 0
    rows = capsys.readouterr().out.split("--- row ")[1:]
    assert len(rows) == 3 and all("<|im_start|>system\nAnswer in capitals.<|im_end|>\n<|im_start|>user" in r
                                  for r in rows)
    assert main(["data", "--model", str(base_dir), "--dataset", data]) == 0
    assert "<|im_start|>system" not in capsys.readouterr().out
