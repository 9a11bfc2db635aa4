"""inject / load / merge_and_unload, lorakit vs PEFT, on the SmolLM2-135M shape with r=16 on all 7 projections.

    python benchmarks/housekeeping.py           # 30 layers, 7 repetitions
    python benchmarks/housekeeping.py --quick   # 4 layers, 2 repetitions

Each operation gets a fresh copy of the base model (the copy is not timed); lorakit and PEFT
run alternately. The adapter file is written by PEFT (random A and B), so both sides load the
same bytes, and merging folds a non-zero update.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    args = C.parser(__doc__).parse_args()
    C.setup(args)
    reps = args.reps or (2 if args.quick else 7)
    import lorakit
    from peft import LoraConfig, PeftModel, get_peft_model

    base = C.build_model(args.quick)
    lk_cfg = lorakit.LoraConfig(r=16, alpha=32, target_modules=C.TARGETS)
    pf_cfg = LoraConfig(r=16, lora_alpha=32, target_modules=C.TARGETS, task_type="CAUSAL_LM")
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    try:
        donor = get_peft_model(C.clone(base), LoraConfig(r=16, lora_alpha=32, target_modules=C.TARGETS,
                                                         task_type="CAUSAL_LM", init_lora_weights="gaussian"))
        with torch.no_grad():
            for name, p in donor.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        donor.save_pretrained(tmp)
        del donor
        x = torch.randint(3, 1000, (1, 16)).to(C.DEVICE)

        def once(setup, op):
            def fn():
                model = setup()
                return C.timed(lambda: op(model))
            return fn

        fns = {
            ("inject", "lorakit"): once(lambda: C.clone(base), lambda m: lorakit.inject(m, lk_cfg)),
            ("inject", "peft"): once(lambda: C.clone(base), lambda m: get_peft_model(m, pf_cfg)),
            ("load", "lorakit"): once(lambda: C.clone(base), lambda m: lorakit.load_adapter(m, tmp)),
            ("load", "peft"): once(lambda: C.clone(base), lambda m: PeftModel.from_pretrained(m, tmp)),
            ("merge", "lorakit"): once(lambda: lorakit.load_adapter(C.clone(base), tmp), lorakit.merge_and_unload),
            ("merge", "peft"): once(lambda: PeftModel.from_pretrained(C.clone(base), tmp),
                                    lambda m: m.merge_and_unload()),
        }
        times = C.alternate(fns, reps)
        # the merged models agree (a check, not a timing)
        with torch.no_grad():
            ours = lorakit.merge_and_unload(lorakit.load_adapter(C.clone(base), tmp))(x).logits
            theirs = PeftModel.from_pretrained(C.clone(base), tmp).merge_and_unload()(x).logits
        diff = (ours - theirs).abs().max().item()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    m = {k: C.med(v) for k, v in times.items()}
    names = {"inject": ("lorakit.inject", "get_peft_model"),
             "load": ("lorakit.load_adapter", "PeftModel.from_pretrained"),
             "merge": ("lorakit.merge_and_unload", "merge_and_unload")}
    rows = []
    for op, (ours_name, theirs_name) in names.items():
        lk, pf = m[(op, "lorakit")], m[(op, "peft")]
        t_lk, t_pf = times[(op, "lorakit")], times[(op, "peft")]
        rows.append([f"{ours_name} vs {theirs_name}", C.fmt_s(lk), C.fmt_s(pf), f"{C.ratio(t_lk, t_pf):.2f}x",
                     f"**{C.ratio(t_pf, t_lk):.1f}x faster**"])
    print(C.header("Housekeeping: inject, load, merge_and_unload", args))
    layers = C.smollm2_config(args.quick).num_hidden_layers
    print(f"{layers} layers, {layers * 7} adapted modules, r=16; times: median of {reps} alternating runs after 1 "
          f"warm-up, each on a fresh copy of the base; ratios: median of the per-round ratios\n")
    print(C.table(["operation", "lorakit", "PEFT", "lorakit / PEFT", "speed-up"], rows))
    print(f"\nmerged models agree: max |logit difference| {diff:.1e}")
    C.dump(args.json, {f"{k[0]}@{k[1]}": v for k, v in times.items()})


if __name__ == "__main__":
    main()
