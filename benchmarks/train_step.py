"""Train step, lorakit vs PEFT: time per step and peak memory, SmolLM2-135M shape, LoRA r=16 on all 7 projections.

    python benchmarks/train_step.py            # the issue's configuration: batch 4 x 256, 30 layers
    python benchmarks/train_step.py --quick    # smoke run: 4 layers, batch 2 x 64, 2 repetitions

Rows: LoRA steps with lora_dropout 0.05 and 0 (lorakit and PEFT timed alternately in one process),
a full fine-tuning step and a no-grad forward of the same batch for scale. Memory: peak RSS of a
fresh child process per side doing the same steps (children run alternately).
Both sides use AdamW: lorakit through lorakit.training.optim.make_optimizer (fused where torch has it),
PEFT and full fine-tuning through torch.optim.AdamW with its defaults.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402

LR = 1e-4


def batch(quick: bool, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 64) if quick else (4, 256)
    return torch.randint(3, 49152, shape, generator=g).to(C.DEVICE)


def make_side(side: str, base, dropout: float, copy: bool = True):
    """(model, optimizer) for one side: 'lorakit', 'peft' or 'full'; on a copy of `base` unless copy=False."""
    model = C.clone(base) if copy else base
    if side == "lorakit":
        import lorakit
        from lorakit.training.optim import make_optimizer

        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, dropout=dropout, target_modules=C.TARGETS))
        model.train()
        return model, make_optimizer(model, lr=LR)
    if side == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=C.TARGETS,
                                                 task_type="CAUSAL_LM"))
        model.train()
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    assert side == "full"
    model.requires_grad_(True)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


def copy_init(peft_model, lk_model) -> None:
    """Give the lorakit adapter PEFT's random A matrices, so both runs compute the same losses."""
    src = {k: v for k, v in peft_model.named_parameters() if "lora_" in k}
    with torch.no_grad():
        for name, p in lk_model.named_parameters():
            if ".adapters.default." in name:
                mod, tail = name.split(".adapters.default.")
                p.copy_(src[f"base_model.model.{mod}.{tail.replace('.weight', '.default.weight')}"])


def step_fn(model, opt, ids, losses: list[float], side: str):
    """One optimizer step; lorakit's forward + backward run inside `lorakit.shared_dropout`, as its trainer's do."""
    if side == "lorakit":
        import lorakit

        context = lambda: lorakit.shared_dropout(model)  # noqa: E731
    else:
        context = contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with context():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return step


def child_main(argv: list[str]) -> None:
    """One side in a fresh process: build, take 3 steps, print peak RSS."""
    import json

    import peft  # noqa: F401  imported on every side so the import's memory does not count for anyone

    side, dropout, quick = argv[0], float(argv[1]), argv[2] == "1"
    C.DEVICE, C.DTYPE = torch.device(argv[3]), getattr(torch, argv[4])
    model, opt = make_side(side, C.build_model(quick), dropout, copy=False)
    ids = batch(quick)
    before = C.peak_memory_mb()
    losses: list[float] = []
    step = step_fn(model, opt, ids, losses, side)
    for _ in range(3):
        step()
    print(json.dumps({"side": side, "dropout": dropout, "rss_before_mb": before, "peak_mb": C.peak_memory_mb()}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    p = C.parser(__doc__)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    args = p.parse_args()
    C.setup(args)
    reps = args.reps or (2 if args.quick else 5)
    ids = batch(args.quick)
    base = C.build_model(args.quick)

    sides, losses = {}, {}
    for p_drop in (0.05, 0.0):
        for side in ("lorakit", "peft"):
            sides[(side, p_drop)] = make_side(side, base, p_drop)
        copy_init(sides[("peft", p_drop)][0], sides[("lorakit", p_drop)][0])
    sides[("full", 0.0)] = make_side("full", base, 0.0)
    fns = {}
    for key, (model, opt) in sides.items():
        losses[key] = []
        fns[key] = step_fn(model, opt, ids, losses[key], key[0])

    def forward():
        with torch.no_grad():
            base(input_ids=ids)
    fns[("forward", 0.0)] = forward

    # The floor for any LoRA step: the frozen base's forward and its backward to the inputs (the
    # gradient every LoRA factor needs flows through every frozen matmul), no LoRA at all.
    frozen = C.clone(base).requires_grad_(False)
    embeds = frozen.get_input_embeddings()(ids).detach()

    def floor():
        frozen(inputs_embeds=embeds.clone().requires_grad_(True), labels=ids).loss.backward()
    fns[("floor", 0.0)] = floor
    times = C.alternate(fns, reps, settle=1)
    m = {k: C.med(v) for k, v in times.items()}

    mem = {}
    if not args.no_memory:
        script = Path(__file__).resolve()
        runs: dict = {}
        for _ in range(1 if args.quick else 2):
            for key in [("lorakit", 0.05), ("peft", 0.05), ("lorakit", 0.0), ("peft", 0.0), ("full", 0.0)]:
                out = C.child(script, [key[0], str(key[1]), "1" if args.quick else "0", args.device, args.dtype])
                runs.setdefault(key, []).append(out["peak_mb"])
        mem = {k: C.med(v) for k, v in runs.items()}

    full, fwd = m[("full", 0.0)], m[("forward", 0.0)]
    t_full = times[("full", 0.0)]
    rows = []
    for p_drop in (0.05, 0.0):
        lk, pf = m[("lorakit", p_drop)], m[("peft", p_drop)]
        t_lk, t_pf = times[("lorakit", p_drop)], times[("peft", p_drop)]
        mem_lk, mem_pf = mem.get(("lorakit", p_drop)), mem.get(("peft", p_drop))
        rows.append([f"LoRA step, dropout {p_drop:g}", C.fmt_s(lk), C.fmt_s(pf), f"**{C.ratio(t_lk, t_pf):.2f}x**",
                     f"{C.ratio(t_lk, t_full):.2f}x / {C.ratio(t_pf, t_full):.2f}x",
                     f"{mem_lk:.0f} MB" if mem_lk else "-", f"{mem_pf:.0f} MB" if mem_pf else "-",
                     f"**{mem_lk / mem_pf:.2f}x**" if mem_lk else "-"])
    mem_full = mem.get(("full", 0.0))
    rows.append(["full fine-tuning step", C.fmt_s(full), "", "", "1.00x", f"{mem_full:.0f} MB" if mem_full else "-",
                 "", ""])
    rows.append(["no-grad forward (base)", C.fmt_s(fwd), "", "", f"{C.ratio(times[('forward', 0.0)], t_full):.2f}x",
                 "", "", ""])
    t_floor = times[("floor", 0.0)]
    rows.append(["floor: frozen base forward + backward, no LoRA", C.fmt_s(m[("floor", 0.0)]),
                 f"{C.ratio(t_floor, times[('peft', 0.05)]):.2f}x / {C.ratio(t_floor, times[('peft', 0.0)]):.2f}x "
                 f"of PEFT's step (dropout 0.05 / 0)", "", f"{C.ratio(t_floor, t_full):.2f}x", "", "", ""])
    mem_label = "peak GPU memory" if C.DEVICE.type == "cuda" else "peak RSS"
    print(C.header("Train step: lorakit vs PEFT", args))
    shape = tuple(ids.shape)
    print(f"batch {shape[0]} x {shape[1]} tokens, r=16, alpha=32, all 7 projections, AdamW; times: median of {reps} "
          f"alternating rounds after 1 warm-up, each side timed on its second step in a row; ratios: median of the "
          f"per-round ratios; {mem_label}: a fresh process per side\n")
    print(C.table(["step", "lorakit", "PEFT", "lorakit / PEFT", "vs full FT (lorakit / PEFT)", f"{mem_label} lorakit",
                   f"{mem_label} PEFT", "lorakit / PEFT"], rows))
    d0 = [abs(a - b) for a, b in zip(losses[("lorakit", 0.0)], losses[("peft", 0.0)])]
    print(f"\nlosses, dropout 0 (same init), step by step: lorakit {[round(x, 5) for x in losses[('lorakit', 0.0)][:4]]}"
          f" PEFT {[round(x, 5) for x in losses[('peft', 0.0)][:4]]}; max |diff| {max(d0):.2e}")
    C.dump(args.json, {"times": {f"{k[0]}@{k[1]}": v for k, v in times.items()},
                       "peak_mb": {f"{k[0]}@{k[1]}": v for k, v in mem.items()}})


if __name__ == "__main__":
    main()
