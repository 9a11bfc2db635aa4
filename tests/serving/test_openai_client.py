"""A real `lorakit serve` subprocess on a free port, used as users do: the official `openai` client,
raw streams that hang up halfway, and a bounded loopback load test."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import ROOT_ADAPTERS, lorakit_serve

KEY = "sk-lorakit-test"
CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def served(disk):
    """`lorakit serve` over the tiny base: a and b given at start (vLLM's two spellings), root adapters."""
    args = ["--model", str(disk["base"]), "--lora-modules", f"a={disk['a']}",
            json.dumps({"name": "b", "path": str(disk["b"])}), "--adapter-root", str(disk["root"]),
            "--max-batch-size", "16", "--max-loras", "8"]
    with lorakit_serve(args, env={"LORAKIT_API_KEY": KEY}) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_openai_client_lists_models(client, disk):
    models = list(client.models.list())
    assert [m.id for m in models] == [disk["base"].name, "a", "b", *ROOT_ADAPTERS]  # a local base by its folder name
    assert all(m.parent == disk["base"].name for m in models[1:])


def test_openai_client_completions_and_chat_match_the_oracle(client, oracle, disk):
    done = client.completions.create(model="a", prompt="hi", max_tokens=9, temperature=0)
    assert done.choices[0].text == oracle.text("a", "hi", 9)
    assert done.usage.completion_tokens == len(oracle.ids("a", "hi", 9))
    answer = client.chat.completions.create(model="r2", messages=CHAT, max_tokens=7, temperature=0)
    assert answer.choices[0].message.content == oracle.text("r2", CHAT, 7)
    assert answer.choices[0].message.role == "assistant"
    base = client.chat.completions.create(model=disk["base"].name, messages=CHAT, max_tokens=7, temperature=0)
    assert base.choices[0].message.content == oracle.text(None, CHAT, 7)


def test_openai_client_streams_with_usage(client, oracle):
    stream = client.chat.completions.create(model="b", messages=CHAT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oracle.text("b", CHAT, 10)
    assert chunks[-1].usage.completion_tokens == len(oracle.ids("b", CHAT, 10))
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if len(oracle.ids("b", CHAT, 10)) == 10 else "stop"]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a", prompt="hi", max_tokens=9, temperature=0, stream=True))
    assert streamed == oracle.text("a", "hi", 9)


def test_openai_client_stop_and_seed(client, oracle):
    full = oracle.text("a", "hi", 12)
    cut = client.completions.create(model="a", prompt="hi", max_tokens=12, temperature=0, stop=full[5:7])
    assert cut.choices[0].text == full[: full.index(full[5:7])] and cut.choices[0].finish_reason == "stop"

    def sample(seed):
        return client.chat.completions.create(model="r4", messages=CHAT, max_tokens=16, temperature=1.0,
                                              seed=seed).choices[0].message.content

    first = sample(123)
    assert sample(123) == first                                      # same seed, same text
    assert any(sample(s) != first for s in (1, 2, 3))                # other seeds, other texts


def test_openai_client_sees_errors_as_its_exceptions(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="Known models"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a", prompt="hi", max_tokens=0)
    wrong = openai.OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def read_until_hangup(url, body, chunks_before_hangup):
    """Stream a request, read a few events, then drop the connection."""
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body, headers=auth()) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= chunks_before_hangup:
                        return seen
    return seen


def streamed_text(url, body):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body, headers=auth()) as r:
            assert r.status_code == 200, r.read()
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])


def metric(url, name):
    text = httpx.get(url + "/metrics", headers=auth()).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_a_client_that_hangs_up_mid_stream_loses_only_its_row(served, oracle):
    url, _ = served
    cancelled = metric(url, 'lorakit_requests_total{finish_reason="cancelled"}')
    long = {"model": "a", "messages": CHAT, "max_tokens": 40, "temperature": 0, "stream": True}
    other = {"model": "b", "messages": [{"role": "user", "content": "yo"}], "max_tokens": 30, "temperature": 0,
             "stream": True}
    box = {}
    keep = threading.Thread(target=lambda: box.setdefault("text", streamed_text(url, other)))
    keep.start()
    assert read_until_hangup(url, long, 3) == 3
    keep.join(60)
    assert box["text"] == oracle.text("b", other["messages"], 30)
    for _ in range(50):
        if metric(url, 'lorakit_requests_total{finish_reason="cancelled"}') == cancelled + 1:
            break
        threading.Event().wait(0.1)
    assert metric(url, 'lorakit_requests_total{finish_reason="cancelled"}') == cancelled + 1
    assert metric(url, "lorakit_running_rows") == 0


def test_load_64_requests_16_clients_8_adapters_2_hang_ups(served, oracle):
    """Bounded loopback load: every completed answer equals its single-request oracle."""
    url, proc = served
    adapters = ["a", "b", *ROOT_ADAPTERS]                            # 8 adapters
    prompts = ["hi", "hello there", "blue cat", "a longer prompt about the sun", "yo", "red dog", "x y z", "sun"]
    jobs = [(adapters[i % 8], prompts[(i * 3) % 8], 6 + i % 11, i) for i in range(64)]
    hangups = {5, 37}                                                # two clients drop their stream halfway
    errors: list[str] = []

    def one(job):
        adapter, prompt, n, i = job
        messages = [{"role": "user", "content": prompt}]
        body = {"model": adapter, "messages": messages, "max_tokens": n, "temperature": 0}
        try:
            if i in hangups:
                read_until_hangup(url, {**body, "max_tokens": 40, "stream": True}, 2)
                return None
            if i % 2:
                got = streamed_text(url, {**body, "stream": True})
            else:
                r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth(), timeout=60)
                assert r.status_code == 200, r.text
                got = r.json()["choices"][0]["message"]["content"]
            return (adapter, messages, n, got)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(f"{adapter} {prompt!r}: {e!r}")
            return None

    with ThreadPoolExecutor(16) as pool:
        answers = [a for a in pool.map(one, jobs) if a is not None]
    assert errors == []
    assert len(answers) == 62
    wrong = [(a, m, n) for a, m, n, got in answers if got != oracle.text(a, m, n)]
    assert wrong == []
    assert proc.poll() is None and httpx.get(url + "/health").json() == {"status": "ok"}
    assert metric(url, "lorakit_running_rows") == 0
    assert metric(url, 'lorakit_requests_total{finish_reason="error"}') == 0
    after = httpx.post(url + "/v1/completions", json={"model": "r5", "prompt": "hi", "max_tokens": 5,
                                                      "temperature": 0}, headers=auth(), timeout=60)
    assert after.json()["choices"][0]["text"] == oracle.text("r5", "hi", 5)
