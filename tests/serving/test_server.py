"""lorakit serve, in process (FastAPI's TestClient): answers, formats, errors, adapters, keys, metrics.

The real subprocess, the `openai` client, disconnects and the load test are in test_openai_client.py.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.models import load_tokenizer
from lorakit.serving.app import create_app
from lorakit.serving.server import Server

from .conftest import ROOT_ADAPTERS

CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture
def make(disk):
    """make(**Server kwargs, api_key=None) -> (TestClient, Server); every server is stopped afterwards."""
    servers = []

    def build(api_key=None, adapters=("a", "b"), **kw):
        model = AutoModelForCausalLM.from_pretrained(disk["base"])
        kw.setdefault("adapter_root", str(disk["root"]))
        server = Server(model, load_tokenizer(str(disk["base"])), "tiny-base",
                        {n: str(disk[n]) for n in adapters}, **kw)
        servers.append(server)
        return TestClient(create_app(server, api_key=api_key)), server

    yield build
    for server in servers:
        server.stop()


def chat(client, model, n=6, **kw):
    return client.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": n,
                                                     "temperature": 0, **kw})


def error_of(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- answers -------------------------------------------------------------------------------------------
def test_models_lists_the_base_and_every_adapter_without_paths(make, disk):
    client, _ = make()
    r = client.get("/v1/models")
    cards = r.json()["data"]
    assert [c["id"] for c in cards] == ["tiny-base", "a", "b", *ROOT_ADAPTERS]
    assert cards[0]["parent"] is None and all(c["parent"] == "tiny-base" for c in cards[1:])
    assert str(disk["tmp"]) not in r.text and "given" not in r.text  # no server path anywhere


def test_staggered_requests_on_different_adapters_equal_each_alone(make, oracle):
    """Requests arrive while others run; each answer is model.generate alone with its adapter."""
    client, server = make(max_batch_size=4)
    asks = [("a", "hi", 14), ("tiny-base", "hello there", 10), ("b", "yo", 12), ("r1", "a longer prompt", 9),
            ("a", "blue cat", 6), ("r3", "x", 11)]
    got: dict[int, dict] = {}

    def ask(i, model, prompt, n):
        time.sleep(0.03 * i)                                         # staggered arrivals
        r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})
        got[i] = r.json()

    threads = [threading.Thread(target=ask, args=(i, *a)) for i, a in enumerate(asks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (model, prompt, n) in enumerate(asks):
        want = oracle.ids(None if model == "tiny-base" else model, prompt, n)
        choice = got[i]["choices"][0]
        assert choice["text"] == oracle.tok.decode(want, skip_special_tokens=True), (model, prompt)
        assert got[i]["usage"] == {"prompt_tokens": len(oracle.tok(prompt)["input_ids"]), "completion_tokens": len(want),
                                   "total_tokens": len(oracle.tok(prompt)["input_ids"]) + len(want)}
        assert choice["finish_reason"] == ("stop" if len(want) < n else "length")
    assert server.metrics.batch_size._sum.get() > server.scheduler.engine.steps  # rows shared steps


def test_chat_answer_and_stream_have_openai_shapes(make, oracle):
    client, _ = make()
    whole = chat(client, "b", n=8).json()
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": oracle.text("b", CHAT, 8)}
    r = chat(client, "b", n=8, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_stop_string_ends_the_answer_truthfully(make, oracle):
    client, _ = make()
    full = oracle.text("a", "hi", 14)
    stop = full[4:6]
    r = client.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 14, "temperature": 0,
                                             "stop": [stop, "never-there"]}).json()
    assert r["choices"][0] == {"index": 0, "text": full[: full.index(stop)], "logprobs": None, "finish_reason": "stop"}
    r = client.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 3, "temperature": 0}).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3


# --- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param, message", [
    ({"model": "a", "prompt": "hi", "max_tokens": "5"}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ({"model": "a", "prompt": "hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "a", "prompt": "hi", "max_tokens": 63}, "max_tokens", "63 is more than the 62 tokens left"),
    ({"model": "a", "prompt": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": "a", "prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ({"model": "a", "prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    ({"model": "a", "prompt": "hi", "n": 2}, "n", "one choice per request"),
    ({"model": "a", "prompt": "hi", "logprobs": 3}, "logprobs", "not returned"),
    ({"model": "a", "prompt": "hi", "seed": 2**64}, "seed", "less than 18446744073709551616"),
    ({"model": "a", "prompt": "hi", "stop": ["s"] * 17}, "stop", "at most 16 items"),
    ({"model": "a", "prompt": "x" * 70}, "prompt", "the prompt has 70 tokens; this server takes at most 63"),
    ({"model": "a", "prompt": ""}, "prompt", "the prompt is empty"),
    ({"model": "a", "prompt": [1, 999]}, "prompt", "token ids must be in [0, 259), got [999]"),
    ({"prompt": "hi"}, "model", "model: Field required"),
    ({"model": 5, "prompt": "hi"}, "model", "model: Input should be a valid string"),
])
def test_bad_completion_requests_are_400_naming_the_field(make, body, param, message):
    client, _ = make()
    err = error_of(client.post("/v1/completions", json=body), 400)
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error"


def test_max_tokens_beyond_the_context_names_the_room(make):
    client, server = make(max_model_len=20)
    err = error_of(client.post("/v1/completions", json={"model": "a", "prompt": "abcde", "max_tokens": 16}), 400)
    assert err["message"] == "max_tokens: 16 is more than the 15 tokens left for the answer (--max-model-len 20 - 5 prompt tokens)"


@pytest.mark.parametrize("body, message", [
    (b"{not json", "the request body is not valid JSON"),
    (b"[1, 2]", "Input should be a valid dictionary"),
    (json.dumps({"model": "a", "messages": []}).encode(), "messages: List should have at least 1 item"),
    (json.dumps({"model": "a", "messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages.0.role"),
    (json.dumps({"model": "a", "messages": "hi"}).encode(), "messages: Input should be a valid list"),
])
def test_malformed_chat_bodies_are_400(make, body, message):
    client, _ = make()
    err = error_of(client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}), 400)
    assert message in err["message"]


def test_unknown_model_is_404_naming_the_known_ones(make):
    client, _ = make()
    err = error_of(chat(client, "nope"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"] == f"The model 'nope' does not exist. Known models: {['tiny-base', 'a', 'b', *ROOT_ADAPTERS]}"
    assert error_of(chat(client, "../root/r1"), 404)["code"] == "model_not_found"  # names are never paths


# --- adapters: loading, security, memory ---------------------------------------------------------------
def test_load_and_unload_like_vllm(make, disk, oracle):
    client, _ = make(adapter_root=None)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(disk["a"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'again' added successfully."
    assert chat(client, "again").json()["choices"][0]["message"]["content"] == oracle.text("a", CHAT, 6)
    assert "already loaded" in error_of(client.post("/v1/load_lora_adapter", json={
        "lora_name": "again", "lora_path": str(disk["a"])}), 400)["message"]
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "again"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'again' removed successfully."
    assert error_of(chat(client, "again"), 404)["code"] == "model_not_found"
    assert error_of(client.post("/v1/unload_lora_adapter", json={"lora_name": "again"}), 404)["param"] == "lora_name"


def test_a_reloaded_adapter_is_never_served_its_old_prefixes(make, disk, oracle):
    """Prompts share the chat template's head, so the engine keeps their keys/values per adapter;
    an adapter unloaded and loaded again under its name with other weights must not reuse them."""
    client, server = make(adapter_root=None)
    engine = server.scheduler.engine
    client.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(disk["a"])})
    for _ in range(2):
        assert chat(client, "again").json()["choices"][0]["message"]["content"] == oracle.text("a", CHAT, 6)
    reused = engine.reused_tokens
    assert reused > 0                                                # the second request reused the first's prompt
    assert f"lorakit_prefix_cache_tokens_total {float(reused)}" in client.get("/metrics").text
    client.post("/v1/unload_lora_adapter", json={"lora_name": "again"})
    client.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(disk["b"])})
    assert chat(client, "again").json()["choices"][0]["message"]["content"] == oracle.text("b", CHAT, 6)
    assert engine.reused_tokens == reused                            # nothing of a's was reused for b's weights


def test_paths_outside_the_roots_are_refused(make, disk):
    client, server = make()
    root = disk["root"]
    (root / "link-out").symlink_to(disk["elsewhere"], target_is_directory=True)
    inner = root / "r-file-link"
    inner.mkdir()
    (inner / "adapter_config.json").write_text((disk["elsewhere"] / "adapter_config.json").read_text())
    (inner / "adapter_model.safetensors").symlink_to(disk["elsewhere"] / "adapter_model.safetensors")
    try:
        for path in ["../elsewhere", str(disk["elsewhere"]), "link-out", "/etc", "r0/../../elsewhere"]:
            err = error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path}), 400)
            assert "outside the allowed adapter folders" in err["message"], path
        err = error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "r-file-link"}), 400)
        assert "adapter_model.safetensors links outside the allowed adapter folders" in err["message"]
        err = error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": "r0"}), 400)
        assert "adapter names are" in err["message"]
        assert "link-out" not in [c["id"] for c in client.get("/v1/models").json()["data"]]
        assert error_of(chat(client, "link-out"), 404)["code"] == "model_not_found"
        assert "evil" not in lorakit.adapter_names(server.model)
        ok = client.post("/v1/load_lora_adapter", json={"lora_name": "fine", "lora_path": "r0"})
        assert ok.status_code == 200                                 # relative to --adapter-root
    finally:
        (root / "link-out").unlink()
        (inner / "adapter_model.safetensors").unlink()
        (inner / "adapter_config.json").unlink()
        inner.rmdir()


def test_a_damaged_adapter_is_400_and_the_server_keeps_serving(make, disk, oracle):
    client, server = make()
    bad = disk["root"] / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((disk["a"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes((disk["a"] / "adapter_model.safetensors").read_bytes()[:100])
    garbled = disk["root"] / "garbled"
    garbled.mkdir()
    (garbled / "adapter_config.json").write_text("{oops")
    (garbled / "adapter_model.safetensors").write_bytes(b"")
    try:
        err = error_of(chat(client, "broken"), 400)
        assert "adapter 'broken' could not be loaded" in err["message"] and "truncated or damaged" in err["message"]
        err = error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "garbled"}), 400)
        assert "adapter_config.json is not valid JSON" in err["message"]
        assert lorakit.adapter_names(server.model) == ["a", "b"]     # nothing half-loaded stays behind
        assert chat(client, "a").json()["choices"][0]["message"]["content"] == oracle.text("a", CHAT, 6)
        assert client.get("/health").json() == {"status": "ok"}
    finally:
        for folder in (bad, garbled):
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()


def test_hostile_values_do_not_hurt_the_batch(make, disk, oracle, tmp_path):
    """A vanishing temperature, an adapter full of NaN, a path too long: answered, and others carry on."""
    import torch
    from safetensors.torch import load_file, save_file

    client, _ = make()
    tiny_t = chat(client, "a", temperature=1e-30).json()
    assert tiny_t["choices"][0]["message"]["content"] == oracle.text("a", CHAT, 6)      # greedy, not NaN
    nan = disk["root"] / "nan"
    nan.mkdir()
    (nan / "adapter_config.json").write_text((disk["a"] / "adapter_config.json").read_text())
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(disk["a"] / "adapter_model.safetensors").items()},
              nan / "adapter_model.safetensors")
    try:
        results = {}
        threads = [threading.Thread(target=lambda m=m: results.setdefault(m, chat(client, m, n=8, temperature=1.0,
                                                                                   seed=1)))
                   for m in ("nan", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results["nan"].status_code == 200 and results["b"].status_code == 200
        assert results["b"].json()["choices"][0]["message"]["content"] == chat(client, "b", n=8, temperature=1.0,
                                                                                seed=1).json()["choices"][0]["message"]["content"]
    finally:
        for f in nan.iterdir():
            f.unlink()
        nan.rmdir()
    err = error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "long", "lora_path": "x" * 5000}), 400)
    assert "cannot be used: File name too long" in err["message"]
    assert client.get("/health").json() == {"status": "ok"}


def test_least_recently_used_adapter_is_evicted_and_reloaded(make, oracle):
    client, server = make(adapters=(), max_loras=2)
    order = ["r0", "r1", "r2", "r0"]                                 # r2 evicts r0, then r0 evicts r1
    for name in order:
        assert chat(client, name).json()["choices"][0]["message"]["content"] == oracle.text(name, CHAT, 6)
    assert lorakit.adapter_names(server.model) == ["r2", "r0"]
    metrics = client.get("/metrics").text
    assert "lorakit_adapter_evictions_total 2.0" in metrics and "lorakit_adapter_loads_total 4.0" in metrics
    assert "lorakit_loaded_adapters 2.0" in metrics


def test_an_adapter_in_use_is_never_evicted(make):
    _, server = make(adapters=(), max_loras=2)
    registry = server.registry
    call = lambda fn: server.scheduler.call(fn).result(10)          # noqa: E731 - the model's own thread
    assert call(lambda: registry.acquire("r0")) and call(lambda: registry.acquire("r1"))
    assert call(lambda: registry.acquire("r2")) is False             # both slots pinned: r2 waits
    call(lambda: registry.release("r0"))
    assert call(lambda: registry.acquire("r2")) is True
    assert registry.loaded_names() == ["r1", "r2"] and registry.pins["r1"] == 1


# --- keys, health, metrics, playground -----------------------------------------------------------------
def test_api_key_guards_every_endpoint_but_health(make, disk):
    client, _ = make(api_key="sekret")
    calls = [("get", "/v1/models", None), ("get", "/metrics", None), ("get", "/", None),
             ("post", "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2}),
             ("post", "/v1/chat/completions", {"model": "a", "messages": CHAT, "max_tokens": 2}),
             ("post", "/v1/load_lora_adapter", {"lora_name": "k", "lora_path": "r0"}),
             ("post", "/v1/unload_lora_adapter", {"lora_name": "a"})]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            err = error_of(getattr(client, method)(path, json=body, headers=headers) if body else
                           getattr(client, method)(path, headers=headers), 401)
            assert err["code"] == "invalid_api_key" and "Authorization: Bearer KEY" in err["message"], path
    assert client.get("/health").status_code == 200
    good = {"Authorization": "Bearer sekret"}
    assert client.get("/v1/models", headers=good).status_code == 200
    assert client.post("/v1/completions", json=calls[3][2], headers=good).status_code == 200
    assert client.get("/", headers={"Authorization": "Basic " + __import__("base64").b64encode(b"me:sekret").decode()}
                      ).status_code == 200                           # a browser's login prompt
    assert client.get("/").headers["www-authenticate"].startswith("Basic")


def test_metrics_count_requests_and_tokens(make):
    client, _ = make()
    used = [chat(client, m, n=n).json()["usage"] for m, n in (("a", 3), ("b", 5), ("tiny-base", 4))]
    text = client.get("/metrics").text
    assert f"lorakit_generation_tokens_total {float(sum(u['completion_tokens'] for u in used))}" in text
    assert f"lorakit_prompt_tokens_total {float(sum(u['prompt_tokens'] for u in used))}" in text
    finished = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("lorakit_requests_total"))
    assert finished == 3
    assert "lorakit_time_to_first_token_seconds_count 3.0" in text and "lorakit_running_rows 0.0" in text


def test_playground_page_is_served(make):
    client, _ = make()
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "tok/s" in r.text


def test_cli_lora_modules_accepts_vllm_forms_and_names_bad_ones(disk, capsys):
    from lorakit.cli import main
    from lorakit.cli.serve import lora_modules

    assert lora_modules(["x=/p", '{"name": "y", "path": "/q", "base_model_name": "m"}', "/some/dir"]) == {
        "x": "/p", "y": "/q", "dir": "/some/dir"}
    with pytest.raises(ValueError, match="the JSON form needs string fields 'name' and 'path'"):
        lora_modules(['{"name": "y"}'])
    assert main(["serve", "--model", str(disk["base"]), "--lora-modules", f"a={disk['tmp'] / 'missing'}"]) == 2
    assert "adapter directory" in capsys.readouterr().err
    for flag, value, message in (("--max-loras", "0", "--max-loras must be at least 1, got 0"),
                                 ("--max-batch-size", "-1", "--max-batch-size must be at least 1, got -1"),
                                 ("--max-model-len", "1", "--max-model-len must be at least 2, got 1"),
                                 ("--prefix-cache-tokens", "-1", "--prefix-cache-tokens must be at least 0, got -1")):
        assert main(["serve", "--model", str(disk["base"]), flag, value]) == 2
        assert message in capsys.readouterr().err


def test_cli_refuses_a_damaged_adapter_at_start(disk, capsys, tmp_path):
    from lorakit.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((disk["a"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert main(["serve", "--model", str(disk["base"]), "--lora-modules", f"bad={bad}", "--port", "1"]) == 2
    assert "adapter 'bad' could not be loaded" in capsys.readouterr().err
    assert not os.environ.get("LORAKIT_API_KEY")


def test_a_server_without_folders_loads_nothing_at_run_time(make, disk):
    client, _ = make(adapters=(), adapter_root=None)
    err = error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(disk["a"])}), 400)
    assert "loads adapters from no folder (start it with --adapter-root DIR to allow one)" in err["message"]


def test_a_failed_step_is_a_500_and_the_next_request_is_served(make, oracle):
    client, server = make()

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    server.model.forward = boom
    try:
        err = error_of(chat(client, "a"), 500)
    finally:
        del server.model.forward
    assert err["type"] == "server_error" and err["message"] == "generation failed: RuntimeError: out of memory"
    assert chat(client, "a").json()["choices"][0]["message"]["content"] == oracle.text("a", CHAT, 6)
    assert 'lorakit_requests_total{finish_reason="error"} 1.0' in client.get("/metrics").text
