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
