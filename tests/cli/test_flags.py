"""What the commands share (cli/flags.py): one flags > --config YAML > defaults rule, help read from
field docstrings, each option on one help line, and the one target parser."""

from dataclasses import dataclass

import pytest
import yaml

from lorakit.cli import build_parser, main
from lorakit.cli.flags import field_docs, parse_targets, settle_inference
from lorakit.cli.sft import config_from_args


def parse(argv):
    return build_parser().parse_args(argv)


def test_one_precedence_rule_for_sft_and_generate(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "a.jsonl", "seed": 7, "lora_rank": 4, "max_new_tokens": 9}))
    sft_yaml = {k: v for k, v in yaml.safe_load(cfg.read_text()).items() if k != "max_new_tokens"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sft_yaml))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"seed": 7, "max_new_tokens": 9}))
    for command, path, extra in (("sft", "s.yaml", []), ("generate", "g.yaml", ["--prompt", "x"])):
        def settled(*flags):
            args = parse([command, "--config", str(tmp_path / path), *extra, *flags])
            return config_from_args(args) if command == "sft" else (settle_inference(args), args)[0]
        assert settled().seed == 7                        # YAML > default
        assert settled("--seed", "3").seed == 3           # flag > YAML
    tc = config_from_args(parse(["sft", "--config", str(tmp_path / "s.yaml")]))
    assert tc.lora_rank == 4 and tc.learning_rate == 1e-4  # default where neither says
    args = parse(["generate", "--prompt", "x"])
    assert settle_inference(args).max_new_tokens == 256 and args.merge is False and args.adapter == []


def test_generate_yaml_errors_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "infer.yaml"
    cfg.write_text("max_tokens: 5\n")
    assert main(["generate", "--config", str(cfg), "--prompt", "x"]) == 2
    assert "unknown key 'max_tokens' (did you mean 'max_new_tokens'?)" in capsys.readouterr().err
    cfg.write_text("- a list\n")
    assert main(["generate", "--config", str(cfg), "--prompt", "x"]) == 2
    assert "expected a mapping of flag names to values, got list" in capsys.readouterr().err
    assert main(["generate", "--config", str(tmp_path / "missing.yaml"), "--prompt", "x"]) == 2
    assert "missing.yaml: file not found" in capsys.readouterr().err


def test_field_docs_are_the_strings_under_the_fields():
    @dataclass
    class Settings:
        rank: int = 8
        """Rank of the update."""
        alpha: float = 16
        name: str = "x"
        """Two
        lines."""

    assert field_docs(Settings) == {"rank": "Rank of the update.", "name": "Two lines."}


@pytest.mark.parametrize("command, line", [
    ("merge", "--output-dir, --output_dir OUTPUT_DIR"),
    ("generate", "--max-new-tokens, --max_new_tokens TOKENS"),
    ("chat", "--adapter DIR [DIR ...]"),
    ("analyze", "--lora-rank, --lora_rank, --rank, -r RANK"),
])
def test_each_option_is_one_help_line_with_its_spellings(command, line, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert out.count(line) == 1 and "--output_dir OUTPUT_DIR, --output-dir" not in out


def test_parse_targets():
    assert parse_targets(["q_proj,v_proj"]) == ["q_proj", "v_proj"]
    assert parse_targets(["q_proj", "v_proj"]) == parse_targets("q_proj v_proj") == ["q_proj", "v_proj"]
    assert parse_targets(["all-linear"]) == parse_targets("ALL-LINEAR ") == "all-linear"
    assert parse_targets([r".*\.(q|v)_proj"]) == r".*\.(q|v)_proj"
    assert parse_targets("self_attn.q_proj") == ["self_attn.q_proj"]  # a dotted suffix, not a regex
