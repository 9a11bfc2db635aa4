"""Several processes on torch.distributed (gloo, CPU), launched as users launch them: 2 processes with
batch 2 train exactly as 1 process with batch 4, under DDP and FSDP2; rank 0 alone writes; the
adapter on disk is whole; a 2-process run resumes with 2 or 1 processes.

The 2-process runs share one torchrun launch (dist_harness.py: torch and transformers imported once);
one more launch goes through `lorakit sft --nproc 2` with torchrun's rendezvous flags.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import byte_tokenizer, ids, tiny_llama, toy_transformer, write_chat

import lorakit
from lorakit.cli import build_parser, main
from lorakit.cli.sft import config_from_args, torchrun_command
from lorakit.io import read_safetensors
from lorakit.training import distributed
from lorakit.training.trainer import TrainConfig, Trainer

HARNESS = Path(__file__).with_name("dist_harness.py")
# 13 rows in global batches of 4: the last batch of each epoch has 1 row, so rank 1 runs a stand-in
# row with weight 0; 4 steps of 2 micro-batches span 2 epochs (the order changes with the epoch).
COMMON = ["--max-steps", "4", "--grad-accum", "2", "--lora-rank", "4", "--lora-dropout", "0", "--learning-rate",
          "5e-3", "--logging-steps", "1", "--max-length", "64", "--seed", "1", "--save-steps", "2",
          "--precision", "fp32"]
TASKS = ("chat", "cls")


def write_cls(path: Path, n: int = 13) -> str:
    """Rows of one length: the tiny model's pad id is not the tokenizer's, so its last-token pooling
    would read padding, which differs between a batch of 4 and two of 2."""
    words = ["great", "awful", "super", "nasty", "sweet", "gross"]
    rows = [{"text": f"{w} movie, really {w}", "label": "pos" if w in ("great", "super", "sweet") else "neg"}
            for w in (words[(5 * i) % len(words)] for i in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    """root/one/<task>: 1 process x batch 4 (in this process); root/runs/<mode>-<task>: 2 x batch 2."""
    root = tmp_path_factory.mktemp("dist")
    data = {"chat": write_chat(root / "chat.jsonl", n=13), "cls": write_cls(root / "cls.jsonl")}
    common = COMMON + ["--model", str(base_dir)]
    for task in TASKS:
        assert main(["sft", *common, "--dataset", data[task], "--batch-size", "4",
                     "--output-dir", str(root / "one" / task)]) == 0
    commands: list[str] = []
    for mode in ("ddp", "fsdp"):
        for task in TASKS:
            extra = ["--gradient-checkpointing"] if task == "chat" else []  # the non-reentrant form
            commands += (["--then"] if commands else []) + [
                "sft", *common, *extra, "--dataset", data[task], "--batch-size", "2", "--distributed", mode,
                "--output-dir", f"runs/{mode}-{task}"]
    (root / "audit").mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(HARNESS), str(root / "audit"), *commands], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


def losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(run / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.distributed
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_with_batch_2_train_as_one_with_batch_4(runs, mode, task):
    one, two = runs / "one" / task, runs / "runs" / f"{mode}-{task}"
    resolved = yaml.safe_load((two / "run.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["distributed"] == mode  # really two processes
    l1, l2 = losses(one), losses(two)
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(l1, l2)) <= 1e-5
    assert max_diff(adapter(one), adapter(two)) <= 1e-5
    if task == "cls":  # the modules_to_save head is trained and saved whole
        heads = [k for k in adapter(two) if k.endswith("score.weight")]
        assert heads and adapter(two)[heads[0]].shape == (2, 32)


@pytest.mark.distributed
def test_fsdp_adapter_is_whole_equals_ddp_and_loads_in_peft(runs, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, ddp_dir, fsdp_dir = runs / "one" / "chat", runs / "runs" / "ddp-chat", runs / "runs" / "fsdp-chat"
    whole, fsdp = adapter(one), adapter(fsdp_dir)
    assert fsdp.keys() == whole.keys()
    for key, tensor in fsdp.items():  # no empty tensor, no one-rank slice
        assert tensor.numel() > 0 and tensor.shape == whole[key].shape, key
        if ".lora_A." in key:
            assert tensor.shape[0] == 4
    assert max_diff(adapter(ddp_dir), fsdp) <= 1e-5

    x = ids(batch=2, seq=10, vocab=200)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), fsdp_dir).eval()
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), ddp_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        got, want, plain = peft_model(x).logits, ours(x).logits, base(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapter does something


@pytest.mark.distributed
def test_only_rank_0_writes(runs):
    rank0 = json.loads((runs / "audit" / "rank0.json").read_text())
    rank1 = json.loads((runs / "audit" / "rank1.json").read_text())
    assert rank1 == []  # not one file opened for writing, renamed, created or removed
    placed = {Path(dst).name for event, dst in rank0 if event == "tempfile.mkstemp"}
    for name in ("adapter_model.safetensors", "optimizer.safetensors", "metrics.jsonl", "loss.png", "report.md",
                 "run.yaml"):
        assert any(p.startswith(f".{name}.") for p in placed), name
    for mode in ("ddp", "fsdp"):  # the folder holds what one process leaves, and no stray temp file
        for task in TASKS:
            files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
            assert files(runs / "runs" / f"{mode}-{task}") == files(runs / "one" / task)


def interrupted_copy(run: Path, dst: Path) -> Path:
    """What a run interrupted right after its step-2 checkpoint leaves on disk."""
    shutil.copytree(run / "checkpoints" / "step-2", dst / "checkpoints" / "step-2")
    lines = (run / "metrics.jsonl").read_text().splitlines()[:2]
    (dst / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return dst


@pytest.mark.distributed
def test_interrupted_two_process_run_resumes_with_two_or_one_process(runs, base_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = COMMON + ["--model", str(base_dir), "--dataset", str(runs / "chat.jsonl"), "--resume"]
    uninterrupted = runs / "runs" / "ddp-chat"
    # one process (batch 4) from the FSDP run's checkpoint (its optimizer state was gathered whole)
    alone = interrupted_copy(runs / "runs" / "fsdp-chat", runs / "resumed-1")
    assert main(["sft", *common, "--batch-size", "4", "--output-dir", str(alone)]) == 0
    # two processes under FSDP from the DDP run's checkpoint, launched by --nproc with rendezvous flags
    pair = interrupted_copy(uninterrupted, runs / "resumed-2")
    assert main(["sft", *common, "--batch-size", "2", "--nproc", "2", "--distributed", "fsdp", "--rdzv-backend",
                 "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--output-dir", str(pair)]) == 0
    for run in (alone, pair):
        assert max_diff(adapter(uninterrupted), adapter(run)) <= 1e-5
        assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
        assert max(abs(a - b) for (_, a), (_, b) in zip(losses(uninterrupted), losses(run))) <= 1e-5
    assert yaml.safe_load((pair / "run.yaml").read_text())["resolved"]["world_size"] == 2


# --- errors, each before any work ---------------------------------------------------------------------
@pytest.mark.distributed
def test_a_world_size_that_does_not_divide_the_global_batch_is_refused(runs, monkeypatch, capsys):
    common = ["sft", "--dataset", str(runs / "chat.jsonl"), "--resume", "--model", "no-such-model"]
    run = interrupted_copy(runs / "runs" / "ddp-chat", runs / "bad-resume")  # global batches of 4 rows
    for key, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}.items():  # as torchrun sets them
        monkeypatch.setenv(key, value)
    assert main([*common, "--batch-size", "1", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "global batches of 4 rows (2 processes x --batch-size 2)" in err
    assert "3 processes cannot share evenly" in err and "divides 4" in err
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    assert main([*common, "--batch-size", "2", "--output-dir", str(run)]) == 2
    assert "with 1 process pass --batch-size 4" in capsys.readouterr().err


def test_nccl_without_gpus_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = write_chat(tmp_path / "d.jsonl")
    assert main(["sft", "--dataset", data, "--dist-backend", "nccl", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--dist-backend nccl needs CUDA GPUs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class Flat(torch.nn.Module):
    """Embedding -> projection -> head: nothing FSDP could shard block by block."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, vocab)


def test_fsdp_refuses_a_model_without_blocks(tmp_path):
    import torch.distributed as dist

    tok = byte_tokenizer()
    cfg = TrainConfig(dataset=[write_chat(tmp_path / "d.jsonl")], output_dir=str(tmp_path / "run"),
                      distributed="fsdp", target_modules="proj", max_steps=1)
    with pytest.raises(ValueError, match="no blocks it can recognise.*use --distributed ddp"):
        Trainer(cfg, model=Flat(len(tok)), tokenizer=tok)
    assert not dist.is_initialized()  # refused before the process group started


def test_a_partial_or_empty_adapter_tensor_is_never_written(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    whole = lorakit.io.adapter_state_dict(model)
    distributed.check_whole(model, "default", whole)  # the whole adapter passes
    a_key = next(k for k in whole if k.endswith("q_proj.lora_A.weight"))
    b_key = next(k for k in whole if k.endswith("v_proj.lora_B.weight"))
    shard = dict(whole, **{a_key: whole[a_key][:2]})  # one rank's rows
    with pytest.raises(RuntimeError, match=r"refusing to write adapter 'default'.*q_proj.lora_A.weight: Tensor of "
                                           r"shape \(2, 16\), expected \(4, 16\)"):
        distributed.check_whole(model, "default", shard)
    with pytest.raises(RuntimeError, match=r"v_proj.lora_B.weight: Tensor of shape \(0,\)"):
        distributed.check_whole(model, "default", dict(whole, **{b_key: torch.empty(0)}))
    with pytest.raises(RuntimeError, match="missing"):
        distributed.check_whole(model, "default", {k: v for k, v in whole.items() if k != a_key})


@pytest.mark.parametrize("size", [2, 3])
def test_each_process_gets_a_disjoint_share_of_every_global_batch(size):
    rows = [7, 3, 9, 1, 4]
    shares = [distributed.share(distributed.World(rank=r, size=size), rows) for r in range(size)]
    assert sorted(i for idx, real in shares if real for i in idx) == sorted(rows)
    assert all(real for _, real in shares)
    last = [distributed.share(distributed.World(rank=r, size=size), [5]) for r in range(size)]
    assert last[0] == ([5], True) and all(s == ([5], False) for s in last[1:])  # stand-in rows, weight 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_lora_is_reduced_and_fsdp_shards_the_frozen_base(tmp_path, mode):
    """One process given --distributed (a process group of one): what the wrappers hold."""
    from torch.distributed.tensor import DTensor
    from tiny import tiny_model

    tok = byte_tokenizer()
    cfg = TrainConfig(dataset=[write_chat(tmp_path / "d.jsonl")], output_dir=str(tmp_path / "run"), lora_rank=4,
                      distributed=mode, max_steps=1, batch_size=4)
    t = Trainer(cfg, model=tiny_model(tok), tokenizer=tok)
    try:
        frozen = {n for n, p in t.model.named_parameters() if not p.requires_grad}
        if mode == "ddp":  # the frozen base is never broadcast nor reduced; no static graph (it breaks no_sync)
            ignored = t.train_model.parameters_to_ignore
            assert frozen <= ignored and not t.train_model.static_graph
            assert not {n for n, p in t.model.named_parameters() if p.requires_grad} & ignored
        else:  # every parameter sharded, the frozen base included
            assert frozen and all(isinstance(p, DTensor) for p in t.model.parameters())
        assert torch.isfinite(torch.tensor(t.train_step()["loss"]))
    finally:
        distributed.close(t.world)


def test_resuming_fsdp_from_a_checkpoint_of_another_rank_names_the_shapes(tmp_path):
    from tiny import tiny_model

    tok = byte_tokenizer()
    cfg = TrainConfig(dataset=[write_chat(tmp_path / "d.jsonl")], output_dir=str(tmp_path / "run"), lora_rank=4,
                      max_steps=2, batch_size=4)
    Trainer(cfg, model=tiny_model(tok), tokenizer=tok).save_checkpoint()
    cfg8 = TrainConfig(**dict(vars(cfg), lora_rank=8, distributed="fsdp", resume=True))
    t = Trainer(cfg8, model=tiny_model(tok), tokenizer=tok)
    try:
        with pytest.raises(ValueError, match=r"does not fit this model's adapter 'default': .*lora_A.weight "
                                             r"\(file \(4, 32\), model \(8, 32\)\).*another r"):
            t.resume()
    finally:
        distributed.close(t.world)


def test_fsdp_finds_decoder_blocks():
    llama = tiny_llama()
    assert distributed.decoder_blocks(llama) == list(llama.model.layers)  # _no_split_modules
    toy = toy_transformer()
    assert distributed.decoder_blocks(toy) == list(toy.blocks)            # a ModuleList of one type


def test_nproc_launches_torchrun_with_the_rendezvous_flags(capsys):
    argv = ["sft", "--dataset", "d.jsonl", "--nproc", "4", "--nnodes", "2", "--rdzv-endpoint", "node0:29500",
            "--rdzv-id", "job7", "--lora-rank", "8", "--resume"]
    args = build_parser().parse_args(argv)
    cmd = torchrun_command(config_from_args(args), args)
    assert cmd[0] == sys.executable
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes", "2", "--rdzv-backend",
                       "c10d", "--rdzv-endpoint", "node0:29500", "--rdzv-id", "job7", "-m", "lorakit", "sft",
                       "--dataset", "d.jsonl", "--lora-rank", "8", "--resume", "true"]
    assert main(["sft", "--dataset", "d.jsonl", "--nnodes", "2"]) == 2
    assert "--nnodes 2 needs --rdzv-endpoint HOST:PORT" in capsys.readouterr().err
