"""lorakit.tasks: the three tasks named once, and telling a model's task from its class or config."""

from types import SimpleNamespace

import pytest

from lorakit.tasks import CAUSAL_LM, PEFT_TASK_TYPE, SEQ2SEQ, SEQ_CLS, TASKS, peft_task_type, task_of_config


@pytest.mark.parametrize("cls, want", [
    ("LlamaForCausalLM", "CAUSAL_LM"), ("GPT2LMHeadModel", "CAUSAL_LM"), ("T5ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("BertForSequenceClassification", "SEQ_CLS"), ("BertForTokenClassification", "TOKEN_CLS"), ("BertModel", None),
])
def test_peft_task_type_from_the_class_name(cls, want):
    assert peft_task_type(cls) == want


def test_task_of_config_reads_architectures_then_encoder_decoder():
    assert task_of_config(SimpleNamespace(architectures=["Qwen2ForCausalLM"])) == CAUSAL_LM
    assert task_of_config(SimpleNamespace(architectures=["BertForSequenceClassification"])) == SEQ_CLS
    assert task_of_config(SimpleNamespace(architectures=None, is_encoder_decoder=True)) == SEQ2SEQ
    assert task_of_config(SimpleNamespace(architectures=["BertModel"])) is None


def test_every_task_has_its_peft_type():
    assert set(PEFT_TASK_TYPE) == set(TASKS) == {CAUSAL_LM, SEQ_CLS, SEQ2SEQ}
