"""Serving: tokens/s and time to first token of lorakit's engine vs a static batcher, one request at a
time, and a naive adapter-switching server, on the same request mix over 8 adapters.

    python benchmarks/serve.py            # embedded SmolLM2-135M-Instruct, 8 adapters, 64 requests, 16 clients
    python benchmarks/serve.py --quick    # 8 requests, 4 clients, 2-6 tokens: a smoke run
    python benchmarks/serve.py --requests 128 --clients 32 --max-tokens 16,128

Systems (same model, same adapters, same requests: chat prompt, adapter, max_tokens, greedy):
 (a) engine: `lorakit serve`'s scheduler thread and continuous-batching engine, without HTTP;
 (b) static: the previous `lorakit serve` batcher (a copy is below): wait 10 ms, then ONE
     model.generate over up to 16 queued requests (adapters routed per row), every request of a
     batch waiting for its longest one;
 (c) serial: one request at a time, model.generate with its adapter routed (`lorakit.using`);
 (d) switch: a naive server: per request, `lorakit.set_adapter` (or `disabled` for the base) and
     model.generate, under a lock, whichever client gets it first.
Clients are closed-loop: each of --clients threads sends its next request when its previous one
is answered. Tokens/s = tokens generated / wall time; TTFT = sending to the first token (b, c, d
do not stream: their first token arrives with the whole answer). The engine's answers are checked
against (c)'s (greedy: the same text expected).
Targets (issue 11): (a) >= 3x (c) and >= 1.5x (b) tokens/s at 16 clients; (a)'s TTFT p50 below (b)'s.
"""

from __future__ import annotations

import queue
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402

PROMPTS = [
    "Give me three tips for a good night's sleep.", "What is the capital of France?", "Write a haiku about rain.",
    "Explain what a LoRA adapter is in one sentence.", "List four fruits that are red.", "How do I boil an egg?",
    "Translate 'good morning' into Spanish.", "What is 17 times 3?", "Name a famous painting by Van Gogh.",
    "Why is the sky blue?", "Suggest a name for a pet turtle.", "What does a compiler do?",
    "Describe the smell of coffee.", "How many legs does a spider have?", "Write a two-line poem about the sea.",
    "What is photosynthesis?",
]
ADAPTERS = [f"task{i}" for i in range(8)]


def embedded_model():
    """The embedded SmolLM2-135M-Instruct and its tokenizer, on --device / --dtype, for inference."""
    from lorakit.models import load_model_and_tokenizer

    torch.set_grad_enabled(False)
    model, tokenizer = load_model_and_tokenizer(None)
    return model.to(C.DEVICE, C.DTYPE).eval(), tokenizer


def make_adapters(model, folder: Path) -> None:
    """8 random r=16 adapters on all 7 projections, small enough that the answers stay fluent."""
    import lorakit

    gen = torch.Generator().manual_seed(0)
    for name in ADAPTERS:
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=C.TARGETS), name=name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".adapters.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_A" in pname else 0.005))
        lorakit.save_adapter(model, folder / name, name=name)
    for name in ADAPTERS:
        lorakit.delete_adapter(model, name)


def request_mix(n: int, lo: int, hi: int, tokenizer) -> list[tuple[str | None, list[int], int]]:
    """(adapter, prompt ids, max_tokens) per request: adapters round-robin (every 9th the base)."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append((None if i % 9 == 8 else ADAPTERS[i % 8], ids, rng.randint(lo, hi)))
    return out


# --- (a) the engine through the server's scheduler -------------------------------------------------------
class EngineSystem:
    def __init__(self, model, tokenizer, batch: int) -> None:
        from lorakit.engine import Engine
        from lorakit.serving.metrics import Metrics
        from lorakit.serving.registry import Registry
        from lorakit.serving.scheduler import Scheduler

        registry = Registry(model, "base", {n: str(FOLDER / n) for n in ADAPTERS}, max_loras=len(ADAPTERS))
        self.scheduler = Scheduler(Engine(model, tokenizer, max_batch_size=batch), registry, Metrics())

    def __call__(self, adapter, ids, n) -> tuple[float, list[int]]:
        from lorakit.engine import Row
        from lorakit.sampling import Sampling
        from lorakit.serving.scheduler import Ticket

        done = threading.Event()

        class Waiter(Ticket):
            def push(self, event) -> None:
                if event.finish is not None:
                    done.set()

        ticket = Waiter(Row(ids, adapter=adapter, sampling=Sampling(max_new_tokens=n)), loop=None)
        self.scheduler.submit(ticket)
        done.wait()
        return ticket.first_token - ticket.arrived, ticket.row.tokens

    def close(self) -> None:
        self.scheduler.stop()


# --- (b) the previous lorakit serve: a static batcher (copied from lorakit 0.1's serving/server.py) --------
class StaticBatcher:
    """Waits up to 10 ms for up to 16 requests, runs ONE model.generate over them, answers them all."""

    def __init__(self, model, tokenizer, batch: int, wait_ms: float = 10.0) -> None:
        self.model, self.tokenizer, self.max_batch, self.wait = model, tokenizer, batch, wait_ms / 1000
        self.jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def __call__(self, adapter, ids, n) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        future: Future = Future()
        self.jobs.put((adapter, ids, n, future))
        tokens = future.result()
        return time.perf_counter() - t0, tokens

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)

    def _loop(self) -> None:
        pending: list = []
        while not self._stop.is_set():
            try:
                pending.append(self.jobs.get(timeout=0.05))
            except queue.Empty:
                if not pending:
                    continue
            deadline = time.monotonic() + self.wait
            while len(pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    pending.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
            batch, pending = pending[: self.max_batch], pending[self.max_batch:]
            for job, tokens in zip(batch, self._generate(batch)):
                job[3].set_result(tokens)

    @torch.no_grad()
    def _generate(self, batch: list) -> list[list[int]]:
        import lorakit

        width = max(len(ids) for _, ids, _, _ in batch)
        pad = self.tokenizer.pad_token_id
        x = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _, _ in batch], device=C.DEVICE)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _, _ in batch], device=C.DEVICE)
        with lorakit.using(self.model, [a for a, _, _, _ in batch]):
            out = self.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max(n for _, _, n, _ in batch),
                                      do_sample=False, pad_token_id=pad)
        return [until_eos(out[i, width:width + n].tolist(), self.tokenizer) for i, (_, _, n, _) in enumerate(batch)]


def until_eos(tokens: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# --- (c) one at a time, (d) switch adapters per request ---------------------------------------------------
class Serial:
    """One request at a time (FIFO worker): model.generate with the adapter routed, or set_adapter."""

    def __init__(self, model, tokenizer, switch: bool) -> None:
        self.model, self.tokenizer, self.switch = model, tokenizer, switch
        self.lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, adapter, ids, n) -> tuple[float, list[int]]:
        import lorakit

        t0 = time.perf_counter()
        x = torch.tensor([ids], device=C.DEVICE)
        kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        with self.lock:
            if not self.switch:
                with lorakit.using(self.model, [adapter]):
                    out = self.model.generate(x, **kw)
            elif adapter is None:
                with lorakit.disabled(self.model):
                    out = self.model.generate(x, **kw)
            else:
                lorakit.set_adapter(self.model, adapter)
                out = self.model.generate(x, **kw)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()

    def close(self) -> None:
        pass


def drive(system, mix, clients: int) -> dict:
    """Closed-loop clients over the mix; wall time, tokens, TTFTs and answers (in mix order)."""
    todo = queue.Queue()
    for i, job in enumerate(mix):
        todo.put((i, job))
    answers: list = [None] * len(mix)
    ttfts: list = [None] * len(mix)

    def client() -> None:
        while True:
            try:
                i, (adapter, ids, n) = todo.get_nowait()
            except queue.Empty:
                return
            ttfts[i], answers[i] = system(adapter, ids, n)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(len(a) for a in answers)
    q = statistics.quantiles(ttfts, n=20)
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": q[18], "answers": answers}


FOLDER = Path()


def main() -> None:
    global FOLDER
    p = C.parser(__doc__)
    p.add_argument("--requests", type=int, default=None, help="requests in the mix (default 64; --quick 8)")
    p.add_argument("--clients", type=int, default=None, help="concurrent closed-loop clients (default 16; --quick 4)")
    p.add_argument("--max-tokens", default=None, help="LO,HI: each request's max_tokens, uniform (default 16,128)")
    p.add_argument("--systems", default="abcd", help="which systems to run (default abcd)")
    args = p.parse_args()
    C.setup(args)
    q = args.quick
    n_req, clients = args.requests or (8 if q else 64), args.clients or (4 if q else 16)
    lo, hi = map(int, (args.max_tokens or ("2,6" if q else "16,128")).split(","))
    import lorakit

    model, tokenizer = embedded_model()
    FOLDER = Path(tempfile.mkdtemp(prefix="lorakit-bench-serve-"))
    try:
        make_adapters(model, FOLDER)
        mix = request_mix(n_req, lo, hi, tokenizer)
        builders = {
            "a": ("(a) engine (continuous batching)", lambda: EngineSystem(model, tokenizer, batch=16)),
            "b": ("(b) static batcher (previous serve)", lambda: StaticBatcher(model, tokenizer, batch=16)),
            "c": ("(c) one request at a time", lambda: Serial(model, tokenizer, switch=False)),
            "d": ("(d) naive: set_adapter + generate", lambda: Serial(model, tokenizer, switch=True)),
        }
        results = {}
        for key in args.systems:
            label, build = builders[key]
            for name in ADAPTERS:
                if name not in lorakit.adapter_names(model):
                    lorakit.load_adapter(model, FOLDER / name, name=name)
            system = build()
            drive(system, mix[: min(4, len(mix))], clients=min(4, clients))      # warm-up
            results[key] = drive(system, mix, clients)
            system.close()
            print(f"{label}: {results[key]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(FOLDER, ignore_errors=True)

    print(C.header(f"Serving {n_req} requests from {clients} clients over {len(ADAPTERS)} adapters", args))
    print(f"SmolLM2-135M-Instruct (embedded), adapters r=16 on all 7 projections, greedy, max_tokens uniform in "
          f"[{lo}, {hi}], every 9th request on the base; one run per system\n")
    rows = []
    for key, r in results.items():
        vs = [f"{r['tok_s'] / results[k]['tok_s']:.2f}x" if k in results else "" for k in "bc"]
        rows.append([builders[key][0], r["tokens"], f"{r['wall']:.1f} s", f"**{r['tok_s']:.1f}**", *vs,
                     C.fmt_s(r["ttft_p50"]), C.fmt_s(r["ttft_p95"])])
    print(C.table(["system", "tokens", "wall", "tokens/s", "vs (b)", "vs (c)", "TTFT p50", "TTFT p95"], rows))
    if "a" in results and "c" in results:
        same = sum(x == y for x, y in zip(results["a"]["answers"], results["c"]["answers"]))
        print(f"\ncheck: the engine's answers equal one-at-a-time generate's in {same}/{len(mix)} requests")
    C.dump(args.json, {k: {m: v for m, v in r.items() if m != "answers"} for k, r in results.items()})


if __name__ == "__main__":
    main()
