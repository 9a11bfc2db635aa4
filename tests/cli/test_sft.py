"""`lorakit sft` as a user runs it: flags and YAML, help that documents every setting, ms-swift 4
spellings, warmup, QLoRA (checked against PEFT over the same NF4 base)."""

import json
import re

import pytest
import torch
import yaml
from tiny import byte_tokenizer, make, save_model_folder, write_chat

import lorakit
from lorakit.cli import build_parser, main
from lorakit.cli.flags import field_docs
from lorakit.cli.sft import config_from_args
from lorakit.training.config import CHOICES, TrainConfig


def parse(argv):
    return build_parser().parse_args(argv)


def sft(*args) -> list[str]:
    return ["sft", *map(str, args)]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- flags, YAML and errors ---------------------------------------------------------------------------
def test_cli_accepts_ms_swift_spellings_and_yaml(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": ["a.jsonl"], "lora_rank": 4, "learning-rate": 3e-4, "max_steps": 7}))
    args = parse(["sft", "--config", str(cfg), "--lora_rank", "16", "--output_dir", "out", "--grad-accum", "2",
                  "--dataset", "b.jsonl", "--resume"])
    tc = config_from_args(args)
    assert tc.lora_rank == 16            # the flag beats the YAML
    assert tc.learning_rate == 3e-4      # the YAML beats the default
    assert tc.max_steps == 7 and tc.output_dir == "out" and tc.grad_accum == 2 and tc.resume is True
    assert tc.dataset == ["b.jsonl"]


def test_yaml_keys_take_any_spelling_and_values_read_as_flags(tmp_path):
    cfg = tmp_path / "swift.yaml"
    cfg.write_text("dataset: a.jsonl\ntuner_type: dora\ntorch_dtype: bfloat16\nlr_scheduler_type: constant_with_warmup\n"
                   "per_device_train_batch_size: 2\ntarget_modules: [q_proj, v_proj]\n")
    tc = config_from_args(parse(["sft", "--config", str(cfg)]))
    assert (tc.train_type, tc.precision, tc.lr_scheduler, tc.batch_size) == ("dora", "bf16", "constant", 2)
    assert tc.lora_config().target_modules == ["q_proj", "v_proj"] and tc.lora_config().use_dora


def test_cli_errors_name_the_flag(tmp_path, capsys):
    data = write_chat(tmp_path / "d.jsonl")
    assert main(["sft", "--dataset", data, "--lora-rank", "0"]) == 2
    assert "--lora-rank must be positive" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnak: 8\n")
    assert main(["sft", "--config", str(bad), "--dataset", data]) == 2
    assert "unknown key 'lora_rnak' (did you mean 'lora_rank'?)" in capsys.readouterr().err
    bad.write_text("train_type: full\n")
    assert main(["sft", "--config", str(bad), "--dataset", data]) == 2
    assert "train_type: full fine-tuning trains every weight; lorakit trains adapters only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["sft", "--lora-rank", "abc"])
    assert "--lora-rank" in capsys.readouterr().err


def test_cli_bad_dataset_row_names_file_line_and_keys(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    assert main(["sft", "--dataset", str(data), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl line 1" in err and "question" in err and "answer" in err


def test_a_bad_flag_shows_the_sft_usage_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--dataset", "d.jsonl", "--lora-rnak", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: lorakit sft --dataset FILE [flags]")
    assert "lorakit sft: error: unrecognized arguments: --lora-rnak (did you mean --lora-rank?) 4" in err


# --- help -------------------------------------------------------------------------------------------
def help_text(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    return capsys.readouterr().out


def option_lines(text: str) -> list[str]:
    """One string per option: its spellings and its help (argparse puts long help on the next lines)."""
    blocks: list[str] = []
    for line in text.splitlines():
        if re.match(r"\s{2}-", line):
            blocks.append(line.strip())
        elif blocks and line.startswith("    ") and line.strip():
            blocks[-1] += " " + line.strip()
        elif not line.startswith("    "):
            blocks.append("")  # a section title or a blank line ends the option
    return [" ".join(b.split()) for b in blocks if b]


def test_sft_help_documents_every_setting_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option and its help
    text = help_text(capsys)
    docs = field_docs(TrainConfig)
    lines = option_lines(text)
    for name in (f.name for f in TrainConfig.__dataclass_fields__.values()):
        flag = "--" + name.replace("_", "-")
        mine = [line for line in lines if line.startswith(flag + ",") or line.startswith(flag + " ")]
        assert len(mine) == 1, flag                                           # each flag once...
        spellings = [re.match(r"((?:-{1,2}[\w-]+, )*-{1,2}[\w-]+)", line).group(1).split(", ") for line in lines]
        assert sum(flag in names for names in spellings) == 1, flag
        doc = docs.get(name, "")
        assert len(doc.split()) >= 3 and doc.lower().rstrip(".") != name.replace("_", " "), \
            f"TrainConfig.{name} needs a docstring saying what it does: it is the --help"
        assert docs[name].split(".")[0][:40] in mine[0], flag                 # ...with its sentence,
        for value in CHOICES.get(name, ()):
            assert value in mine[0], (flag, value)                            # its choices,
        default = TrainConfig.__dataclass_fields__[name].default
        if default not in (None, "", [], TrainConfig.__dataclass_fields__["dataset"].default):
            shown = str(default).lower() if isinstance(default, bool) else str(default)
            assert f"Default: {shown}." in mine[0], flag                      # and its default
    lora = next(line for line in lines if line.startswith("--lora-rank"))
    assert lora.startswith("--lora-rank, --lora_rank, --rank, -r RANK ")     # aliases on the same line
    epochs = next(line for line in lines if line.startswith("--epochs"))
    assert epochs.startswith("--epochs, --num-train-epochs, --num_train_epochs EPOCHS ")
    assert "Default: 0." in next(line for line in lines if line.startswith("--save-steps")) and "0: only at the end" in text
    assert "grad accum (default" not in text and "precision (default" not in text


# --- ms-swift 4 ------------------------------------------------------------------------------------------
def test_ms_swift_4_spellings_train_a_run(base_dir, tmp_path, capsys):
    data = write_chat(tmp_path / "d.jsonl", n=8)
    run = tmp_path / "run"
    assert main(sft("--model", base_dir, "--dataset", data, "--output_dir", run, "--tuner_type", "dora",
                    "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", 2, "--torch_dtype", "float32",
                    "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--num_train_epochs", 1,
                    "--save_strategy", "steps", "--save_steps", 1, "--save_total_limit", 9, "--system", "Be brief.",
                    "--target_modules", "q_proj", "v_proj", "--learning_rate", "1e-3", "--lora_rank", 4)) == 0
    settings = yaml.safe_load((run / "run.yaml").read_text())
    assert {k: settings[k] for k in ("train_type", "lr_scheduler", "warmup_steps", "precision", "batch_size",
                                     "grad_accum", "epochs", "save_steps", "system")} == {
        "train_type": "dora", "lr_scheduler": "constant", "warmup_steps": 2, "precision": "fp32", "batch_size": 2,
        "grad_accum": 2, "epochs": 1.0, "save_steps": 1, "system": "Be brief."}
    assert settings["resolved"]["total_steps"] == 2  # 8 rows / (2 x 2)
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["use_dora"] and {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {"q_proj", "v_proj"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]  # --save_strategy steps
    lrs = [r["lr"] for r in metrics(run) if "lr" in r]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3], abs=1e-6)  # --warmup_steps 2: lr x (s + 1) / (2 + 1)


@pytest.mark.parametrize("args, why", [
    (["--tuner_type", "full"], "full fine-tuning trains every weight; lorakit trains adapters only"),
    (["--tuner_type", "vera"], "'vera' is an ms-swift tuner lorakit does not implement"),
    (["--lr_scheduler_type", "polynomial"], "'polynomial' is a transformers schedule lorakit does not implement"),
    (["--save_strategy", "epoch"], "lorakit checkpoints every --save-steps optimizer steps"),
    (["--torch_dtype", "int8"], "got 'int8'; choose one of auto, fp32, bf16, fp16"),
    (["--deepspeed", "zero2"], "--deepspeed is not supported: lorakit scales out with torchrun"),
    (["--model_type", "qwen2"], "--model_type is not supported: lorakit reads the model's type from its config.json"),
    (["--template", "chatml"], "--template is not supported: lorakit formats chat rows with the tokenizer's own"),
    (["--quant_bits", "4"], "--quant_bits is not supported: lorakit quantizes the base only to 4-bit NF4, with "
                            "--train-type qlora"),
])
def test_ms_swift_flags_that_make_no_sense_here_are_refused_with_why(args, why, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--dataset", "d.jsonl", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: lorakit sft") and why in err


def test_save_strategy_no_saves_only_at_the_end(base_dir, tmp_path, capsys):
    data = write_chat(tmp_path / "d.jsonl", n=8)
    assert main(sft("--model", base_dir, "--dataset", data, "--output-dir", tmp_path / "run", "--max-steps", 3,
                    "--save_strategy", "no", "--lora-rank", 2)) == 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-3"]
    assert main(sft("--dataset", data, "--save_strategy", "no", "--save_steps", 5)) == 2
    assert "--save-strategy no saves only at the end; drop --save-steps 5" in capsys.readouterr().err


# --- warmup --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [["--warmup-ratio", "0.2"], ["--warmup-steps", "3"]])
def test_warmup_is_rounded_up_as_transformers_and_printed(base_dir, tmp_path, capsys, warmup):
    data = write_chat(tmp_path / "d.jsonl", n=8)
    run = tmp_path / "run"
    assert main(sft("--model", base_dir, "--dataset", data, "--output-dir", run, "--max-steps", 12, "--lora-rank", 2,
                    "--batch-size", 2, "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--logging-steps", 1,
                    *warmup)) == 0
    assert "12 optimizer steps of 2 x 1 rows; warmup 3 steps, then constant" in capsys.readouterr().out
    lrs = [r["lr"] for r in metrics(run) if "lr" in r][:5]  # 0.2 x 12 = 2.4 -> ceil 3 (int() gave 2)
    assert lrs == pytest.approx([1e-3 * s / 4 for s in (1, 2, 3)] + [1e-3, 1e-3], abs=1e-6)


@pytest.mark.parametrize("steps, ratio, want", [(120, 0.0833, 10), (120, 10 / 120, 10), (60, 0.1, 6), (7, 0.5, 4)])
def test_warmup_ratio_rounds_up_without_float_noise(tmp_path, steps, ratio, want):
    t = make(tmp_path, byte_tokenizer(), max_steps=steps, warmup_ratio=ratio)  # 0.1 * 60 = 6.000000000000001
    assert t.warmup_steps == want


def test_warmup_steps_and_ratio_together_are_refused(tmp_path, capsys):
    data = write_chat(tmp_path / "d.jsonl", n=4)
    assert main(sft("--dataset", data, "--warmup-steps", 3, "--warmup-ratio", 0.1)) == 2
    assert "set --warmup-steps (3) or --warmup-ratio (0.1), not both" in capsys.readouterr().err


# --- QLoRA ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qlora_base(tmp_path_factory):
    """hidden 64: bitsandbytes' CPU kernels want multiples of 32."""
    return save_model_folder(tmp_path_factory.mktemp("qbase"), hidden=64)


def test_qlora_from_the_cli_trains_and_matches_peft_over_the_same_nf4_base(qlora_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    data = write_chat(tmp_path / "d.jsonl", n=16)
    run = tmp_path / "run"
    assert main(sft("--model", qlora_base, "--dataset", data, "--train-type", "qlora", "--output-dir", run,
                    "--max-steps", 12, "--batch-size", 4, "--learning-rate", "1e-2", "--lr-scheduler", "constant",
                    "--lora-rank", 4, "--lora-dropout", 0, "--logging-steps", 1)) == 0
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3   # it learns

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)

    def base_4bit():
        model = AutoModelForCausalLM.from_pretrained(qlora_base, quantization_config=nf4, dtype=torch.float32,
                                                     device_map={"": "cpu"})
        return lorakit.qlora.prepare_model(model)  # both sides in bitsandbytes' standard layout (see qlora.py)

    theirs = PeftModel.from_pretrained(base_4bit(), str(run)).eval()
    ours = lorakit.load_adapter(base_4bit(), run).eval()
    x = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = theirs(x).logits, ours(x).logits
        with lorakit.disabled(ours):
            base = ours(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the trained adapter moves the outputs


# --- the real model ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_trains_a_few_steps(tmp_path):
    data = write_chat(tmp_path / "d.jsonl", n=8)
    assert main(["sft", "--dataset", data, "--max-steps", "2", "--batch-size", "2", "--lora-rank", "4",
                 "--max-length", "64", "--output-dir", str(tmp_path / "run")]) == 0
    for f in ("adapter_model.safetensors", "adapter_config.json", "loss.png", "run.yaml", "report.md"):
        assert (tmp_path / "run" / f).is_file()
    records = metrics(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
