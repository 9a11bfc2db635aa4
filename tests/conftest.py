"""Shared fixtures. Nothing comes from a model hub: every test runs offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's
# spin-waits make a 16x16 matmul take milliseconds (generate() ran 300x slower with 2 threads while
# a training job shared the cores). LORAKIT_TEST_THREADS overrides, e.g. for the slow real-model tests.
torch.set_num_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 as a 3-label classifier (seeded head). Copy it before changing it."""
    from tiny import minilm_classifier

    return minilm_classifier(seed=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved as a local model folder with the byte tokenizer (for the commands)."""
    from tiny import save_model_folder

    return save_model_folder(tmp_path_factory.mktemp("base"))
