"""`lorakit analyze` from the command line: the tables and JSON, and the LoRA flags it shares with
`lorakit sft` (same spellings, help and defaults, so analyze describes the sft run with those flags)."""

import json

import pytest
from test_analysis import TINY, TINY_BASE
from transformers import LlamaConfig

from lorakit.analysis import analyze
from lorakit.cli import build_parser, main
from lorakit.cli.sft import LORA_FLAGS
from lorakit.training.config import TrainConfig


@pytest.fixture
def tiny_dir(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path / "tiny")  # a config alone, no weights
    return tmp_path / "tiny"


def test_cli_json_and_plot(tiny_dir, tmp_path, capsys):
    png = tmp_path / "plots" / "r.png"
    assert main(["analyze", "--model", str(tiny_dir), "--lora_rank", "8", "--target-modules", "q_proj,v_proj",
                 "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_params"] == 3584 and out["base_params"] == TINY_BASE and out["modules"] == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["r.png"]  # no temp file left behind


def test_cli_table(tiny_dir, capsys):
    assert main(["analyze", "--model", str(tiny_dir), "--lora-rank", "8", "--target-modules", "q_proj", "v_proj"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "64×64" in out and "2,048" in out and "total" in out
    assert "MiB" in out and "assumptions" in out and "trainable 3,584" in out


def test_cli_help_and_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    assert e.value.code == 0 and "--target-modules" in capsys.readouterr().out
    assert main(["analyze", "--model", str(tmp_path / "nothing-here" / "config.json")]) == 2


def options(command: str) -> dict[str, tuple]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {a.dest: (a.option_strings, a.help, a.default, a.type) for a in sub._actions if a.dest in LORA_FLAGS}


def test_analyze_takes_sfts_lora_flags_and_defaults(tiny_dir, capsys):
    assert options("analyze") == options("sft") and set(options("sft")) == set(LORA_FLAGS)
    assert main(["analyze", "--model", str(tiny_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = analyze(str(tiny_dir), TrainConfig(dataset=["rows.jsonl"]).lora_config()).to_dict()  # sft's defaults
    assert got == want and got["trainable_params"] == 2 * 8 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 160 + 64
                                                               + 160 + 160 + 64)  # r=8 on all 7 linears
    assert main(["analyze", "--model", str(tiny_dir), "--json", "--target_modules", "q_proj", "v_proj", "-r", "4",
                 "--lora_alpha", "8", "--lora-dropout", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    cfg = TrainConfig(dataset=["rows.jsonl"], target_modules="q_proj,v_proj", lora_rank=4, lora_alpha=8, lora_dropout=0)
    assert got == analyze(str(tiny_dir), cfg.lora_config()).to_dict() and got["trainable_params"] == 2 * 4 * (128 + 96)


def test_analyze_counts_dora_and_refuses_what_it_cannot_count(tiny_dir, capsys):
    assert main(["analyze", "--model", str(tiny_dir), "--json", "--train-type", "dora", "--target-modules", "q_proj"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 2 * (8 * 128 + 64)  # + a magnitude per output
    assert main(["analyze", "--model", str(tiny_dir), "--train-type", "qlora"]) == 2
    assert "analyze counts lora and dora adapters, not --train-type qlora" in capsys.readouterr().err
