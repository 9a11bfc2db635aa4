"""lorakit.engine: continuous batching, per-row adapters, rows joining and leaving between steps.

The oracle for every greedy row is `model.generate` on that row alone with its adapter (and PEFT's
`adapter_names` batch): the engine must give the very same tokens whatever shares the batch.
"""

import pytest
import torch
from tiny import byte_tokenizer, tiny_gpt2, tiny_model, tiny_t5, two_adapter_model

import lorakit
from lorakit.engine import CANCELLED, LENGTH, STOP, Engine, Row, eos_ids, supports
from lorakit.sampling import Sampling

PROMPTS = ["hello there", "yo", "a much longer prompt than the others", "x", "blue cat", "red dog sun"]
ADAPTERS = ["a", None, "b", "a", "b", None]
LENGTHS = [12, 5, 20, 9, 15, 7]


@pytest.fixture(scope="module")
def two():
    """A tiny Llama over the byte tokenizer with adapters a (q, v) and b (all linear, another rank)."""
    return two_adapter_model()


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def alone(model, tok, prompt, adapter, n, eos):
    """model.generate on one row with only its adapter: the tokens the engine must reproduce."""
    x = torch.tensor([encode(tok, prompt)])
    with lorakit.using(model, [adapter]), torch.no_grad():
        out = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=sorted(eos))
    return out[0, x.shape[1]:].tolist()


def test_staggered_rows_equal_model_generate_alone_and_peft(two):
    from peft import PeftModel

    model, tok = two
    engine = Engine(model, tok, max_batch_size=3)                   # 6 rows, 3 places: some must wait
    rows = [Row(encode(tok, p), adapter=a, sampling=Sampling(max_new_tokens=n))
            for p, a, n in zip(PROMPTS, ADAPTERS, LENGTHS)]
    engine.add(rows[0])
    engine.step()
    engine.add(rows[1])
    engine.step()
    engine.step()
    for row in rows[2:]:
        engine.add(row)
    assert len(engine.running) == 2 and len(engine.waiting) == 4
    sizes = []
    while not engine.idle:
        engine.step()
        sizes.append(len(engine.running))
    assert max(sizes) == 3                                           # the batch was full while rows waited
    for row, p, a, n in zip(rows, PROMPTS, ADAPTERS, LENGTHS):
        assert row.tokens == alone(model, tok, p, a, n, engine.eos), (p, a)
        assert row.finish_reason in (STOP, LENGTH)
        assert row.text == tok.decode(row.tokens, skip_special_tokens=True)
    assert rows[0].tokens != alone(model, tok, PROMPTS[0], None, LENGTHS[0], engine.eos)  # the adapter acts

    # PEFT's mixed batch (adapter_names) on the same adapters gives the same tokens
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("a", "b"):
            lorakit.save_adapter(model, f"{tmp}/{name}", name=name)
        base = tiny_model(tok).eval()
        peft = PeftModel.from_pretrained(base, f"{tmp}/a", adapter_name="a")
        peft.load_adapter(f"{tmp}/b", adapter_name="b")
        peft.eval()
        for row, p, a, n in zip(rows, PROMPTS, ADAPTERS, LENGTHS):
            x = torch.tensor([encode(tok, p)])
            with torch.no_grad():
                out = peft.generate(input_ids=x, adapter_names=[a or "__base__"], max_new_tokens=n, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=sorted(engine.eos))
            assert row.tokens == out[0, x.shape[1]:].tolist()


def test_finished_rows_leave_and_padding_columns_are_trimmed(two):
    model, tok = two
    engine = Engine(model, tok)
    long = engine.add(Row(encode(tok, "a much longer prompt than the others"), sampling=Sampling(max_new_tokens=2)))
    short = engine.add(Row(encode(tok, "hi"), adapter="a", sampling=Sampling(max_new_tokens=8)))
    engine.step()                                                    # prefill both, one decode: long is done
    assert long.done and long.finish_reason == LENGTH and engine.running == [short]
    width = engine._mask.shape[1]
    assert width == len(short.prompt) + len(short.tokens) - 1        # every padding column went with the long row
    assert all(layer.keys.shape == (1, 1, width, 16) for layer in engine._cache.layers)
    while not engine.idle:
        engine.step()
    assert short.tokens == alone(model, tok, "hi", "a", 8, engine.eos)
    assert engine._cache is None and engine._mask is None


def test_stop_strings_end_a_row_and_are_not_in_its_text(two):
    model, tok = two
    free = Engine(model, tok).run([Row(encode(tok, "blue cat"), adapter="b", sampling=Sampling(max_new_tokens=12))])[0]
    stop = free.text[3:5]                                            # a string the row will produce
    row = Engine(model, tok).run([Row(encode(tok, "blue cat"), adapter="b",
                                      sampling=Sampling(max_new_tokens=12, stop=("zzz", stop)))])[0]
    cut = free.text.index(stop)
    assert row.finish_reason == STOP and row.text == free.text[:cut] and stop not in row.text
    assert len(row.tokens) < len(free.tokens)                        # it stopped early, not after the fact


def test_eos_ends_each_row_on_its_own(two):
    model, tok = two
    probe = Engine(model, tok).run([Row(encode(tok, "x"), sampling=Sampling(max_new_tokens=6))])[0]
    engine = Engine(model, tok)
    engine.eos = {probe.tokens[2]}                                  # make the row's third token its EOS
    rows = engine.run([Row(encode(tok, "x"), sampling=Sampling(max_new_tokens=6)),
                       Row(encode(tok, "a much longer prompt than the others"), adapter="a",
                           sampling=Sampling(max_new_tokens=6))])
    assert rows[0].finish_reason == STOP and rows[0].tokens == probe.tokens[:3]
    assert rows[1].tokens == alone(model, tok, "a much longer prompt than the others", "a", 6, engine.eos)


def test_seeded_sampling_does_not_depend_on_the_batch(two):
    model, tok = two
    s = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    solo = Engine(model, tok).run([Row(encode(tok, "hi"), adapter="a", sampling=s)])[0]
    mixed = Engine(model, tok).run([Row(encode(tok, "yo yo"), sampling=Sampling(max_new_tokens=4, temperature=1.0)),
                                    Row(encode(tok, "hi"), adapter="a", sampling=s)])[1]
    other = Engine(model, tok).run([Row(encode(tok, "hi"), adapter="a", sampling=Sampling(
        max_new_tokens=10, temperature=1.0, top_p=0.9, seed=8))])[0]
    assert solo.tokens == mixed.tokens
    assert solo.tokens != other.tokens


def test_top_p_keeps_only_the_nucleus():
    from lorakit.sampling import pick_tokens

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    row = Row([1], sampling=Sampling(temperature=1.0, top_p=0.8, seed=0))
    row.generator = torch.Generator().manual_seed(0)
    drawn = {pick_tokens(logits, [row])[0] for _ in range(200)}
    assert drawn == {0, 1}                                           # 0.6 + 0.3 >= 0.8: tokens 2, 3 never drawn


def test_cancelled_row_is_dropped_and_the_others_carry_on(two):
    model, tok = two
    engine = Engine(model, tok)
    keep = engine.add(Row(encode(tok, "hello there"), adapter="a", sampling=Sampling(max_new_tokens=10)))
    gone = engine.add(Row(encode(tok, "yo"), adapter="b", sampling=Sampling(max_new_tokens=10)))
    engine.step()
    gone.cancelled = True
    changed = engine.step()
    assert gone in changed and gone.finish_reason == CANCELLED and engine.running == [keep]
    while not engine.idle:
        engine.step()
    assert keep.tokens == alone(model, tok, "hello there", "a", 10, engine.eos)


def test_prefill_is_capped_so_running_rows_keep_decoding(two):
    model, tok = two
    engine = Engine(model, tok, max_prefill_tokens=12)
    rows = [engine.add(Row(encode(tok, "eight ch"), sampling=Sampling(max_new_tokens=5))) for _ in range(3)]
    engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == 2     # 2 x 8 tokens > 12: one row per prefill
    engine.step()
    assert len(engine.running) == 2 and len(rows[0].tokens) == 3     # the first row decoded meanwhile
    while not engine.idle:
        engine.step()
    assert all(r.tokens == rows[0].tokens for r in rows)


def test_gpt2_runs_on_the_engine():
    tok = byte_tokenizer()
    model = tiny_gpt2(vocab=len(tok), hidden=32)
    rows = Engine(model, tok).run([Row(encode(tok, p), sampling=Sampling(max_new_tokens=6)) for p in ("hi", "a b c d")])
    for row, p in zip(rows, ("hi", "a b c d")):
        x = torch.tensor([encode(tok, p)])
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(eos_ids(model, tok)))
        assert row.tokens == out[0, x.shape[1]:].tolist()


def test_encoder_decoder_is_refused_by_name():
    tok = byte_tokenizer()
    model = tiny_t5(vocab=len(tok))
    assert not supports(model)
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is not a causal LM with a plain DynamicCache"):
        Engine(model, tok)


def test_prompt_longer_than_the_model_is_refused(two):
    model, tok = two
    with pytest.raises(ValueError, match="the prompt has 70 tokens; this engine takes at most 63"):
        Engine(model, tok).add(Row([5] * 70))


def test_visible_text_holds_back_a_possible_stop_string():
    row = Row([1], sampling=Sampling(stop=("###",)))
    row.text = "answer ##"
    assert row.visible_text() == "answer "
    row.text = "caf\ufffd"
    assert row.visible_text() == "caf"
    row.finish_reason = LENGTH
    assert row.visible_text() == "caf\ufffd"


def test_routing_is_held_while_the_rows_stay_and_left_when_idle(two):
    from lorakit.state import get_state

    model, tok = two
    state = get_state(model)
    active = lorakit.active_adapters(model)
    engine = Engine(model, tok)
    engine.add(Row(encode(tok, "hi"), adapter="a", sampling=Sampling(max_new_tokens=4)))
    engine.add(Row(encode(tok, "yo"), adapter="b", sampling=Sampling(max_new_tokens=8)))
    engine.step()                                                    # prefill, then a decode over both rows
    held = state.routing
    assert held is not None and held.names == ["a", "b"]
    engine.step()
    assert state.routing is held                                     # same rows: the same routing serves
    engine.step()                                                    # the first row ends here
    engine.step()
    regrouped = state.routing                                        # one row left: the same block, regrouped
    assert regrouped is not held and regrouped.names == ["b"]
    layer = next(m for m in model.modules() if isinstance(m, lorakit.LoraLinear))
    assert regrouped.plan(layer).a.data_ptr() == held.plan(layer).a.data_ptr()  # the factors, not a copy
    while not engine.idle:
        engine.step()
    assert state.routing is None and lorakit.active_adapters(model) == active


def test_a_failed_step_fails_its_rows_and_the_engine_starts_afresh(two):
    from lorakit.engine import ERROR
    from lorakit.state import get_state

    model, tok = two
    engine = Engine(model, tok)
    first = engine.add(Row(encode(tok, "hi"), adapter="a", sampling=Sampling(max_new_tokens=6)))
    engine.step()
    second = engine.add(Row(encode(tok, "yo"), adapter="b", sampling=Sampling(max_new_tokens=6)))

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    model.forward = boom                                             # the prefill of the second row fails
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.step()
    finally:
        del model.forward
    failed = engine.abort("generation failed: out of memory")
    assert set(failed) == {first, second} and all(r.finish_reason == ERROR for r in failed)
    assert engine.idle and get_state(model).routing is None
    again = engine.run([Row(encode(tok, "yo"), adapter="b", sampling=Sampling(max_new_tokens=6))])[0]
    assert again.tokens == alone(model, tok, "yo", "b", 6, engine.eos)


SYSTEM = "You are a careful assistant. "                             # 29 bytes: a shared chat-template head


def test_a_prompt_that_starts_like_a_kept_one_prefills_only_the_rest(two):
    """The prefix cache: per adapter, the longest kept prefix (all but the last prompt token at most)
    is reused; the tokens stay those of model.generate alone, whatever mix of hits shares a prefill."""
    model, tok = two
    engine = Engine(model, tok, max_batch_size=4)
    first = [Row(encode(tok, SYSTEM + p), adapter=a, sampling=Sampling(max_new_tokens=6))
             for p, a in (("hello", "a"), ("hello", "b"), ("hi", None))]
    engine.run(first)
    assert engine.reused_tokens == 0                                 # one prefill: nothing was kept before it
    wave = [("bye now", "a", 10), ("plain", "b", 7), ("hello", "b", 8), ("hi", None, 5), ("", "a", 4)]
    rows = [Row(encode(tok, SYSTEM + p if p != "plain" else "a plain prompt"), adapter=a,
                sampling=Sampling(max_new_tokens=n)) for p, a, n in wave]
    engine.add(rows[0])
    engine.add(rows[1])                                              # a hit and a miss in one prefill
    engine.step()
    for row in rows[2:]:
        engine.add(row)
        engine.step()
    while not engine.idle:
        engine.step()
    want = [len(SYSTEM), 0, len(SYSTEM + "hello") - 1, len(SYSTEM + "hi") - 1, len(SYSTEM) - 1]
    assert engine.reused_tokens == sum(want)                         # a's "bye now" shares the system head only
    for row, (p, a, n) in zip([*first, *rows], [("hello", "a", 6), ("hello", "b", 6), ("hi", None, 6), *wave]):
        text = SYSTEM + p if p != "plain" else "a plain prompt"
        assert row.tokens == alone(model, tok, text, a, n, engine.eos), (p, a)


def test_prefixes_are_kept_per_adapter_bounded_and_forgotten(two):
    model, tok = two
    engine = Engine(model, tok, prefix_cache_tokens=40)
    engine.run([Row(encode(tok, SYSTEM + "one"), adapter="a", sampling=Sampling(max_new_tokens=2))])
    engine.run([Row(encode(tok, SYSTEM + "two"), adapter="b", sampling=Sampling(max_new_tokens=2))])
    assert engine.reused_tokens == 0                                 # the same head under another adapter: no reuse
    assert engine.prefixes.tokens == 32                               # 40 tokens at most: a's prompt was dropped
    engine.run([Row(encode(tok, SYSTEM + "three"), adapter="a", sampling=Sampling(max_new_tokens=2))])
    assert engine.reused_tokens == 0
    engine.run([Row(encode(tok, SYSTEM + "four"), adapter="a", sampling=Sampling(max_new_tokens=2))])
    assert engine.reused_tokens == len(SYSTEM)
    engine.forget(["a"])                                             # a's weights changed: its prefixes go
    engine.run([Row(encode(tok, SYSTEM + "five"), adapter="a", sampling=Sampling(max_new_tokens=2))])
    assert engine.reused_tokens == len(SYSTEM)
    off = Engine(model, tok, prefix_cache_tokens=0)
    off.run([Row(encode(tok, SYSTEM + p), adapter="a", sampling=Sampling(max_new_tokens=2)) for p in ("x", "y")])
    off.run([Row(encode(tok, SYSTEM + "z"), adapter="a", sampling=Sampling(max_new_tokens=2))])
    assert off.reused_tokens == 0 and not len(off.prefixes)


def test_rows_that_share_a_head_in_one_prefill_compute_it_once(two):
    """Nothing kept yet, but five new rows share the system head per adapter: the heads run once
    (one forward), are kept, and every row reuses its adapter's; the tokens stay model.generate's."""
    model, tok = two
    engine = Engine(model, tok)
    wave = [("one", "a"), ("two", "a"), ("three", "a"), ("x1", "b"), ("x2", "b"), ("solo", None)]
    rows = [Row(encode(tok, SYSTEM + p), adapter=a, sampling=Sampling(max_new_tokens=6)) for p, a in wave]
    engine.run(rows)
    assert engine.reused_tokens == 3 * len(SYSTEM) + 2 * len(SYSTEM + "x")   # None's single row: nothing shared
    for row, (p, a) in zip(rows, wave):
        assert row.tokens == alone(model, tok, SYSTEM + p, a, 6, engine.eos), (p, a)
    few = Engine(model, tok)                                         # two rows sharing 29 tokens: too little to pay
    few.run([Row(encode(tok, SYSTEM + p), adapter="a", sampling=Sampling(max_new_tokens=2)) for p in ("p", "q")])
    assert few.reused_tokens == 0
