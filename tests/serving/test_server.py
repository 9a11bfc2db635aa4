"""lorakit serve: OpenAI-style endpoints over one base model with several adapters, batched."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from tiny import make_adapter
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.generation import Sampling, generate
from lorakit.models import load_tokenizer
from lorakit.serving.server import Engine, create_app


@pytest.fixture
def served(base_dir, tmp_path):  # noqa: F811
    make_adapter(base_dir, tmp_path / "a", seed=1)
    make_adapter(base_dir, tmp_path / "b", seed=2)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lorakit.load_adapter(model, tmp_path / "a", name="a")
    lorakit.load_adapter(model, tmp_path / "b", name="b")
    engine = Engine(model, load_tokenizer(str(base_dir)), max_batch=8, wait_ms=300)
    yield TestClient(create_app(engine)), engine, tmp_path
    engine.stop()


def oracle(base_dir, adapter_dir, prompt, n):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter_dir:
        lorakit.load_adapter(model, adapter_dir)
    return generate(model, load_tokenizer(str(base_dir)), [[{"role": "user", "content": prompt}]], Sampling(max_new_tokens=n))[0]


def test_models_lists_base_and_adapters(served):
    client, _, _ = served
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["base", "a", "b"]


def test_concurrent_requests_share_a_batch_and_match_single_runs(served, base_dir):  # noqa: F811
    client, engine, tmp = served
    asks = [("a", "hi"), ("b", "hello"), ("base", "hey"), ("a", "yo")]

    def ask(model_prompt):
        model, prompt = model_prompt
        r = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, asks))
    assert engine.batches_run < len(asks)  # at least two requests went through one generate()
    for (model, prompt), text in zip(asks, got):
        want = oracle(base_dir, None if model == "base" else tmp / model, prompt, 5)
        assert text == want


def test_unknown_model_is_404_with_the_list(served):
    client, _, _ = served
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "available" in r.json()["detail"] and "'a'" in r.json()["detail"]


def test_adapters_load_and_unload_at_runtime(served, base_dir):  # noqa: F811
    client, engine, tmp = served
    make_adapter(base_dir, tmp / "c", seed=3)
    r = client.post("/v1/adapters", json={"name": "c", "path": str(tmp / "c")})
    assert r.status_code == 200 and "c" in r.json()["adapters"]
    assert client.post("/v1/adapters", json={"name": "c", "path": str(tmp / "c")}).status_code == 409
    bad = client.post("/v1/adapters", json={"name": "d", "path": str(tmp / "missing")})
    assert bad.status_code == 400 and "does not exist" in bad.json()["detail"]
    assert client.delete("/v1/adapters/c").json()["adapters"] == ["a", "b"]
    assert client.delete("/v1/adapters/c").status_code == 404


def test_bad_request_is_rejected_by_validation(served):
    client, _, _ = served
    r = client.post("/v1/chat/completions", json={"model": "a", "max_tokens": 0, "messages": []})
    assert r.status_code == 422
