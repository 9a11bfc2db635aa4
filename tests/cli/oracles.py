"""The oracles the command tests compare with: PEFT over the plain transformers model."""

from __future__ import annotations

import torch
from peft import PeftModel
from tiny import minilm_dir
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer


def peft_t5(t5_dir, run):
    return PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5_dir), str(run)).eval()


def t5_generate(model, t5_dir, text, n=6) -> str:
    tok = AutoTokenizer.from_pretrained(t5_dir)
    ids = tok([text], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True).strip()


def peft_probs(run, texts) -> torch.Tensor:
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)
    model = PeftModel.from_pretrained(base, str(run)).eval()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
