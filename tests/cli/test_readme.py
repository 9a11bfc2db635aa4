"""README.md cannot rot: every command in its code blocks runs (on tiny models standing in for the
ones it names), every file it links exists in the repository, its ms-swift table matches the
parser, and its layout table lists every module."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import minilm_dir, save_model_folder, write_chat

import lorakit
from lorakit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CHAT_FILES = ("train.jsonl", "test.jsonl", "other.jsonl")


def code_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, body, the text before the block) of every fenced block."""
    return [(m.group(1), m.group(2), text[:m.start()]) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def commands(text: str) -> list[str]:
    """Every `lorakit ...` and `curl ...` line of the shell blocks, without trailing comments."""
    out = []
    for lang, body, _ in code_blocks(text):
        if lang in ("", "sh", "bash", "console"):
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line.startswith(("lorakit ", "curl ")):
                    out.append(line)
    return out


def yaml_files(text: str) -> dict[str, str]:
    """YAML blocks, by the last `*.yaml` file name named in the sentence before them."""
    named = {}
    for lang, body, before in code_blocks(text):
        if lang == "yaml":
            names = re.findall(r"`([\w./-]+\.yaml)`", before[-300:])
            assert names, f"a yaml block in README.md needs its file name (`name.yaml`) just before it:\n{body}"
            named[names[-1]] = body
    return named


# --- the stand-ins -----------------------------------------------------------------------------------
def write_data(folder: Path) -> None:
    for i, name in enumerate(CHAT_FILES):
        write_chat(folder / name, n=12, seed=i)
    rows = [{"prompt": "red cat", "adapter": "x"}, {"prompt": "blue dog", "adapter": "y"},
            {"prompt": "sun", "adapter": None}]
    reviews = [{"text": f"{w} film, truly {w}", "label": lab} for w, lab in
               [("gripping", "pos"), ("dull", "neg"), ("lovely", "pos"), ("tedious", "neg")] * 3]
    pairs = [{"source": f"Translate to German: {en}", "target": de} for en, de in
             [("good morning", "guten Morgen"), ("thank you", "danke"), ("good night", "gute Nacht")] * 4]
    for name, items in (("rows.jsonl", rows), ("reviews.jsonl", reviews), ("pairs.jsonl", pairs)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in items))


@pytest.fixture(scope="module")
def models(tmp_path_factory, t5_dir):
    """The models the README names, as tiny local folders (all-MiniLM-L6-v2 is a real small BERT)."""
    return {"smollm2-135m-instruct": str(save_model_folder(tmp_path_factory.mktemp("llama"))),
            "google/flan-t5-base": str(t5_dir), "bert-base-uncased": str(minilm_dir())}


def adapted(line: str, models: dict[str, str]) -> list[str]:
    """A README command made small: tiny models, few steps, few tokens."""
    for name, path in models.items():
        line = line.replace(name, path)
    argv = shlex.split(line)[1:]
    command = argv[0]
    if command in ("sft", "data", "analyze") and "--model" not in argv:
        argv += ["--model", models["smollm2-135m-instruct"]]  # the embedded default, played by the tiny Llama
    if command == "sft":
        if "--nproc" in argv and "--rdzv-endpoint" not in argv:
            argv[argv.index("--nproc") + 1] = "2"  # as many processes as this machine has cores
        if "--max-steps" in argv:
            argv[argv.index("--max-steps") + 1] = "4"
        else:
            argv += ["--max-steps", "4"]
    if command in ("generate", "chat") and "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", "8"]
    return argv


def outputs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--output-dir", "--output", "--plot")]


def made_elsewhere(lines: list[str]) -> set[str]:
    """`runs/NAME` adapters the README uses but no command of it writes (`make demo` writes runs/demo)."""
    used = {m for line in lines for m in re.findall(r"runs/[\w-]+", line)}
    written = {m for line in lines for m in re.findall(r"--output-dir (runs/[\w-]+)", line)}
    return used - written


@pytest.fixture
def workdir(models, tmp_path, monkeypatch):
    """A folder as the README's reader has it: the data files, the YAML files it shows, and the
    adapters it uses without making them (`make demo`'s runs/demo); commands run from there."""
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    for name, body in yaml_files(README).items():
        for model, path in models.items():
            body = body.replace(model, path)
        (tmp_path / name).write_text(body)
    for run in sorted(made_elsewhere(commands(README))):
        assert main(adapted(f"lorakit sft --dataset train.jsonl --lora-rank 4 --output-dir {run}", models)) == 0
    return tmp_path


def test_readme_commands_all_run(models, workdir, monkeypatch, capsys):
    lines = [line for line in commands(README) if not line.startswith(("lorakit serve", "curl "))]
    assert len(lines) >= 15
    data_files = {f for line in lines for f in re.findall(r"--(?:dataset|eval-dataset|prompts) (\S+)", line)}
    assert data_files <= {p.name for p in workdir.iterdir()}, "give each README data file a tiny version here"
    for line in lines:
        argv = adapted(line, models)
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/exit\n"))  # `lorakit chat` reads the keyboard
        if "--rdzv-endpoint" in argv:  # several nodes: check the torchrun command it launches, do not wait for node0
            launched = []
            with monkeypatch.context() as m:
                m.setattr("lorakit.cli.sft.subprocess.call", lambda cmd: launched.append(cmd) or 0)
                assert main(argv) == 0, line
            cmd = launched[0]
            assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--rdzv-endpoint" in cmd, cmd
            assert cmd[cmd.index("--nnodes") + 1] == argv[argv.index("--nnodes") + 1], cmd
            continue
        assert main(argv) == 0, line
        for path in outputs(argv):
            assert Path(path).exists(), f"{line}: wrote no {path}"
        out = capsys.readouterr().out
        if argv[0] == "generate" and "runs/sst2" in line and "--prompt" in argv:  # the classifier's line
            assert re.fullmatch(r"(neg|pos)  \(neg 0\.\d{4}, pos 0\.\d{4}\)", out.strip()), out


@pytest.mark.slow  # starts a server process (~30 s on a busy 2-core machine)
def test_readme_serving_example_runs(workdir, models):
    lines = [line for line in commands(README) if line.startswith(("lorakit serve", "curl "))]
    assert lines and lines[0].startswith("lorakit serve")
    serve_and_call(lines, workdir, models)


def serve_and_call(lines: list[str], cwd: Path, models: dict[str, str]) -> None:
    """`lorakit serve` as a process, then the README's curl lines against it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = [line for line in lines if line.startswith("lorakit serve")]
    assert len(serve) == 1, serve
    argv = [a for a in shlex.split(serve[0])[1:]]
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    if "--model" not in argv:  # the embedded default, played by the tiny Llama the adapters were made for
        argv += ["--model", models["smollm2-135m-instruct"]]
    if "--adapter-root" in argv:
        (cwd / argv[argv.index("--adapter-root") + 1]).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(lorakit.__file__).parents[1])}
    server = subprocess.Popen([sys.executable, "-m", "lorakit", *argv], cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(server, port)
        for line in lines:
            if line.startswith("curl "):
                line = re.sub(r'"max_tokens": \d+', '"max_tokens": 8', line)  # the tiny model's context is 64
                curl = shlex.split(line.replace("localhost:8000", f"127.0.0.1:{port}"))
                done = subprocess.run(curl + ["--silent", "--show-error", "--max-time", "120"], capture_output=True,
                                      text=True, check=True)
                reply = json.loads(done.stdout)
                assert "error" not in reply and reply.get("choices"), (line, reply)
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_until_up(server: subprocess.Popen, port: int, timeout: float = 180) -> None:
    import urllib.request

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.poll() is not None:
            raise AssertionError(f"lorakit serve exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("lorakit serve did not answer /health")


# --- links and tables -----------------------------------------------------------------------------
def test_readme_links_point_inside_the_repository():
    links = re.findall(r"\]\(([^)#\s]+)", README)
    local = [link for link in links if not re.match(r"\w+://", link)]
    assert local, "no links found"
    for link in local:
        assert not link.startswith(".."), f"README.md links outside the repository: {link}"
        assert (ROOT / link).exists(), f"README.md links to {link}, which is not in the repository"


def test_readme_ms_swift_table_matches_the_parser():
    section = README[README.index("### ms-swift spellings"):]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    sft = next(a for a in build_parser()._actions if a.dest == "command").choices["sft"]
    dest = {opt: action.dest for action in sft._actions for opt in action.option_strings}
    assert len(rows) >= 12
    for row in rows:
        theirs, ours = row.split(" | ")[:2]
        flags = re.findall(r"`(--[\w-]+)", theirs)
        target = re.findall(r"`(--[\w-]+)", ours)
        for flag in flags:
            assert flag in dest, f"the README says lorakit sft takes {flag}"
            want = target[0] if target else flag.replace("_", "-")
            assert dest[flag] == dest[want], (flag, want)


def test_readme_layout_lists_every_module():
    section = README[README.index("## Layout"):]
    listed = set(re.findall(r"`(\w+\.py)`", section))
    modules = {p.name for p in (ROOT / "src" / "lorakit").rglob("*.py") if not p.name.startswith("__")}
    assert modules - listed == set(), "add these modules to README.md's layout table"
    assert listed - modules == set(), "README.md's layout table names modules that do not exist"
