"""Run under torchrun: several `lorakit sft` command lines (split by `--then`) in one launch, so the
processes import torch and transformers once, and record every file this process writes.

    torchrun --nproc-per-node 2 --standalone dist_harness.py AUDIT_DIR sft ... --then sft ...

The process group is started here, so the runs share it. A Python audit hook records each
write-like event (open for writing, temp file or folder, rename, mkdir, remove) on a path under
the current folder's `runs/` into AUDIT_DIR/rank<R>.json: the test that only rank 0 writes reads them.
"""

import json
import os
import sys

WRITE_EVENTS = ("tempfile.mkstemp", "tempfile.mkdtemp", "os.rename", "os.mkdir", "os.remove", "os.rmdir",
                "shutil.rmtree", "os.truncate")


def main() -> int:
    audit_dir, argv = sys.argv[1], sys.argv[2:]
    watched = os.path.abspath("runs")
    writes: list[list[str]] = []

    def under(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(watched)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and under(args[0]) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
            writes.append([event, os.fsdecode(args[0])])
        elif event in WRITE_EVENTS and args and under(args[0]):
            writes.append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)
    import torch.distributed as dist

    from lorakit.cli import main as lorakit_main

    dist.init_process_group("gloo")
    commands, current = [], []
    for arg in argv + ["--then"]:
        if arg == "--then":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    code = 0
    for command in commands:
        code = lorakit_main(command)
        if code:
            break
    rank = dist.get_rank()
    dist.destroy_process_group()
    with open(os.path.join(audit_dir, f"rank{rank}.json"), "w") as f:
        json.dump(writes, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
