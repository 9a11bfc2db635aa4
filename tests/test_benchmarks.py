"""benchmarks/: the scripts' own argument checks (the timings themselves are not tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
@pytest.mark.parametrize("script", ["train_step.py", "mixed_batch.py", "housekeeping.py", "serve.py",
                                    "batch_generate.py"])
def test_cuda_without_a_gpu_is_refused_by_name(script):
    out = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--device cuda: torch sees no CUDA device here" in out.stderr


def test_sft_data_is_deterministic_held_out_and_right(tmp_path):
    sys.path.insert(0, str(BENCH))
    import sft_data

    train, test = sft_data.rows(200, 50)
    assert (train, test) == sft_data.rows(200, 50)
    users = lambda part: {r["messages"][0]["content"] for r in part}  # noqa: E731
    assert len(users(train)) == 200 and not users(train) & users(test)
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in train + test}
    for user, answer in answers.items():  # recompute each family's answer from its instruction
        nums = [int(n) for n in user.replace(",", " ").replace("?", " ").replace(".", " ").split() if n.isdigit()]
        if user.startswith("Add "):
            assert answer == f"{nums[0]} + {nums[1]} = {sum(nums)}"
        elif user.startswith("Sort ascending"):
            assert answer == ", ".join(map(str, sorted(nums)))
        elif user.startswith("Which is larger"):
            assert answer.startswith(f"{max(nums)} is larger")
        elif user.startswith("Write the word"):
            assert answer == user.split()[3].upper()


def test_sft_e2e_help_and_settings():
    out = subprocess.run([sys.executable, str(BENCH / "sft_e2e.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--steps", "--rows", "--test-rows", "--eval-rows", "--rounds", "--only", "--work-dir", "--threads"):
        assert flag in out.stdout
    sys.path.insert(0, str(BENCH))
    import sft_e2e

    cmd = sft_e2e.lorakit_cmd(sft_e2e.parse(["--steps", "120"]), Path("d"), Path("o"), "auto")
    flags = dict(zip(cmd[4::2], cmd[5::2]))  # after: python -m lorakit sft
    assert flags["--warmup-steps"] == "10" and flags["--lr-scheduler"] == "linear"
    assert (flags["--lora-rank"], flags["--lora-alpha"], flags["--lora-dropout"]) == ("16", "32", "0.05")
    assert flags["--gradient-checkpointing"] == "false" and flags["--precision"] == "auto"


def test_bf16_matmul_runs_small():
    out = subprocess.run([sys.executable, str(BENCH / "bf16_matmul.py"), "--m", "8", "--k", "8", "--n", "8",
                          "--reps", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| fp32 |" in out.stdout and "| bf16 |" in out.stdout and "bf16 speed-up over fp32" in out.stdout
