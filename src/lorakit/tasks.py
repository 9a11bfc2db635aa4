"""The tasks lorakit trains and serves, named once, and how to tell which one a model is for.

    causal_lm   decoder LMs (Llama, Qwen, GPT-2, SmolLM2):  AutoModelForCausalLM,                 PEFT "CAUSAL_LM"
    seq2seq     encoder-decoders (T5, BART):               AutoModelForSeq2SeqLM,                PEFT "SEQ_2_SEQ_LM"
    seq_cls     classifiers (BERT + a head):                AutoModelForSequenceClassification,   PEFT "SEQ_CLS"
"""

from __future__ import annotations

from typing import Any

CAUSAL_LM, SEQ2SEQ, SEQ_CLS = "causal_lm", "seq2seq", "seq_cls"
TASKS = (CAUSAL_LM, SEQ_CLS, SEQ2SEQ)
PEFT_TASK_TYPE = {CAUSAL_LM: "CAUSAL_LM", SEQ_CLS: "SEQ_CLS", SEQ2SEQ: "SEQ_2_SEQ_LM"}
TASK_OF_PEFT_TYPE = {v: k for k, v in PEFT_TASK_TYPE.items()}
DESCRIPTION = {CAUSAL_LM: "causal LM", SEQ2SEQ: "seq2seq LM", SEQ_CLS: "sequence classifier"}
SUPPORTED = "causal LMs (Llama, Qwen, GPT-2), seq2seq LMs (T5, BART) and sequence classifiers (BERT + a head)"

# transformers class-name endings -> PEFT task_type (also the heads PEFT knows but lorakit does not train)
_PEFT_TYPE_BY_CLASS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                       ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                       ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                       ("ForQuestionAnswering", "QUESTION_ANS"))


def peft_task_type(class_name: str) -> str | None:
    """PEFT's task_type for a model class ("LlamaForCausalLM" -> "CAUSAL_LM"), None when unknown."""
    return next((task for suffix, task in _PEFT_TYPE_BY_CLASS if class_name.endswith(suffix)), None)


def task_of_config(config: Any) -> str | None:
    """The task a model config was saved for, from `architectures` (or `is_encoder_decoder`); None: unknown."""
    for arch in getattr(config, "architectures", None) or []:
        task = TASK_OF_PEFT_TYPE.get(peft_task_type(arch) or "")
        if task:
            return task
    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    return None


def task_of_model(model: Any) -> str | None:
    """The task a loaded model runs, from its class ("T5ForConditionalGeneration" -> "seq2seq")."""
    return TASK_OF_PEFT_TYPE.get(peft_task_type(type(model).__name__) or "")
