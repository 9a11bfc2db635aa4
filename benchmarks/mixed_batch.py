"""Inference, lorakit vs PEFT: one adapter (unmerged / merged), and mixed batches of 16 rows with 16 adapters.

    python benchmarks/mixed_batch.py            # SmolLM2-135M shape, 30 layers
    python benchmarks/mixed_batch.py --quick    # 4 layers, short sequences, 2 repetitions

Rows:
- one adapter, batch 4 x 256, no grad: the plain base model, lorakit unmerged, lorakit merged
  (`lorakit.merge`, wrappers kept), PEFT unmerged; ratios against the plain base;
- mixed prefill, 16 rows x 128 tokens, row i on adapter i (`lorakit.per_row` vs PEFT's
  `adapter_names`), against the plain base's forward of the same batch;
- mixed greedy decoding, 16 rows x 32 prompt tokens + 32 new tokens with a KV cache
  (`model.generate`), tokens/s = 16 * 32 / wall time.
All adapters have r=16 on all 7 projections and random non-zero A and B; PEFT loads lorakit's
files, and the benchmark checks that both give the same logits and the same tokens.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402

N_ADAPTERS = 16


def main() -> None:
    args = C.parser(__doc__).parse_args()
    C.setup(args)
    q = args.quick
    reps = args.reps or (2 if q else 5)
    import lorakit
    from lorakit.state import lora_layers
    from peft import PeftModel

    torch.set_grad_enabled(False)
    base = C.build_model(q).eval()
    names = [f"t{i}" for i in range(N_ADAPTERS)]
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    try:
        many = C.clone(base)
        gen = torch.Generator().manual_seed(0)
        for name in names:
            lorakit.inject(many, lorakit.LoraConfig(r=16, alpha=32, target_modules=C.TARGETS), name=name)
        for _, layer in lora_layers(many):
            for ad in layer.adapters.values():
                ad.lora_A.weight.normal_(0, 0.02, generator=gen)
                ad.lora_B.weight.normal_(0, 0.02, generator=gen)
        for name in names:
            lorakit.save_adapter(many, tmp / name, name=name)
        many.eval()
        peft_many = PeftModel.from_pretrained(C.clone(base), tmp / names[0], adapter_name=names[0])
        for name in names[1:]:
            peft_many.load_adapter(tmp / name, adapter_name=name)
        peft_many.eval()
        one = lorakit.load_adapter(C.clone(base), tmp / names[0]).eval()
        one_merged = lorakit.load_adapter(C.clone(base), tmp / names[0]).eval()
        lorakit.merge(one_merged)
        peft_one = PeftModel.from_pretrained(C.clone(base), tmp / names[0]).eval()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    g = torch.Generator().manual_seed(1)
    x_one = torch.randint(3, 49152, (2, 64) if q else (4, 256), generator=g).to(C.DEVICE)
    x_pre = torch.randint(3, 49152, (N_ADAPTERS, 16 if q else 128), generator=g).to(C.DEVICE)
    x_gen = torch.randint(3, 49152, (N_ADAPTERS, 8 if q else 32), generator=g).to(C.DEVICE)
    new = 8 if q else 32
    gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=2)

    def routed(fn):
        def run():
            with lorakit.per_row(many, names):
                return fn()
        return run

    results = {}
    results["one"] = C.alternate({
        "base": lambda: base(x_one),
        "lorakit unmerged": lambda: one(x_one),
        "lorakit merged": lambda: one_merged(x_one),
        "PEFT unmerged": lambda: peft_one(x_one),
    }, reps)
    results["prefill"] = C.alternate({
        "base": lambda: base(x_pre),
        "lorakit per_row": routed(lambda: many(x_pre)),
        "PEFT adapter_names": lambda: peft_many(x_pre, adapter_names=names),
    }, reps)
    results["decode"] = C.alternate({
        "base": lambda: base.generate(x_gen, **gen_kw),
        "lorakit per_row": routed(lambda: many.generate(x_gen, **gen_kw)),
        "PEFT adapter_names": lambda: peft_many.generate(input_ids=x_gen, adapter_names=names, **gen_kw),
    }, reps)

    # checks: the fast paths compute what PEFT computes
    with lorakit.per_row(many, names):
        ours_logits = many(x_pre).logits
        ours_tokens = many.generate(x_gen, **gen_kw)
    theirs_logits = peft_many(x_pre, adapter_names=names).logits
    theirs_tokens = peft_many.generate(input_ids=x_gen, adapter_names=names, **gen_kw)
    diff_pre = (ours_logits - theirs_logits).abs().max().item()
    same_tokens = torch.equal(ours_tokens, theirs_tokens)
    diff_one = (one(x_one).logits - peft_one(x_one).logits).abs().max().item()
    diff_merged = (one_merged(x_one).logits - one(x_one).logits).abs().max().item()

    m = {sec: {k: C.med(v) for k, v in d.items()} for sec, d in results.items()}
    rows = []
    for k in ("base", "lorakit unmerged", "lorakit merged", "PEFT unmerged"):
        rows.append([f"one adapter, {k}", f"{tuple(x_one.shape)}", C.fmt_s(m['one'][k]),
                     f"**{C.ratio(results['one'][k], results['one']['base']):.3f}x**", ""])
    for k in ("base", "lorakit per_row", "PEFT adapter_names"):
        rows.append([f"mixed prefill, {k}", f"{tuple(x_pre.shape)}", C.fmt_s(m['prefill'][k]),
                     f"**{C.ratio(results['prefill'][k], results['prefill']['base']):.3f}x**", ""])
    tokens = N_ADAPTERS * new
    dec = results["decode"]
    for k in ("base", "lorakit per_row", "PEFT adapter_names"):
        t = m["decode"][k]
        rows.append([f"mixed decode, {k}", f"{tuple(x_gen.shape)} + {new}", C.fmt_s(t),
                     f"{C.ratio(dec[k], dec['base']):.2f}x",
                     f"{tokens / t:.0f} tok/s (**{C.ratio(dec['PEFT adapter_names'], dec[k]):.2f}x PEFT**)"])
    print(C.header("Inference: one adapter, and 16 adapters in one batch", args))
    print(f"r=16 on all 7 projections, no grad, eval; times: median of {reps} alternating runs after 1 warm-up; "
          f"ratios: median of the per-round ratios\n")
    print(C.table(["run", "input", "time", "vs base", "tokens/s"], rows))
    print(f"\nchecks: one adapter lorakit vs PEFT max |logit diff| {diff_one:.1e}; merged vs unmerged {diff_merged:.1e}; "
          f"mixed prefill lorakit vs PEFT {diff_pre:.1e}; mixed greedy tokens identical: {same_tokens}")
    C.dump(args.json, {sec: {k: v for k, v in d.items()} for sec, d in results.items()})


if __name__ == "__main__":
    main()
