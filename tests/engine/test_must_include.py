"""`must_include`: a row may not end (EOS, stop ids, hold ids, a stop string spread over several tokens) before
each phrase has appeared in its output; max_new_tokens still ends it, and batch-mates are unaffected."""
from __future__ import annotations

import pytest
import torch

from server.engine.engine import Engine, EngineConfig
from server.engine.sampling import RowSampler, SamplingParams, StopParts, choose_tokens, phrase_spellings
from tests.engine.test_exactness import PROMPTS, run_alone
from tests.engine.test_sampling_and_lifecycle import drive


def _run(engine: Engine, prompt, params: SamplingParams):
    h = engine.submit(prompt, params)
    drive(engine, [h])
    return h.wait(0)


def test_a_phrase_already_said_changes_nothing(loaded):
    engine = Engine(loaded)
    free = run_alone(engine, PROMPTS[0], None, 10)
    stop_at = free[6]
    i = free.index(stop_at)  # the first place the unconstrained row would stop
    plain = _run(engine, PROMPTS[0], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,)))
    said = _run(engine, PROMPTS[0], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,),
                                                   must_include=(((free[i - 2], free[i - 1]),),)))
    assert said.token_ids == plain.token_ids == free[:i + 1] and said.finish_reason == "stop_sequence"


def test_a_missing_phrase_holds_back_eos_stop_and_hold_ids_until_max_new_tokens(loaded):
    free = run_alone(Engine(loaded), PROMPTS[1], None, 12)
    stop_at, eos, hold = free[2], free[4], free[5]
    vocab = loaded.spec.vocab_size
    never = (vocab - 1, vocab - 2, vocab - 3)  # a phrase the row does not say
    engine = Engine(loaded, EngineConfig(eos_token_ids=(eos,)))
    r = _run(engine, PROMPTS[1], SamplingParams(max_new_tokens=12, stop_token_ids=(stop_at,), hold_ids=(hold,),
                                                must_include=((never,),)))
    assert r.finish_reason == "length" and len(r.token_ids) == 12
    assert not {stop_at, eos, hold} & set(r.token_ids)
    # ignore_eos: EOS was never an ending token, so it is not held back
    r = _run(engine, PROMPTS[1], SamplingParams(max_new_tokens=12, ignore_eos=True, must_include=((never,),)))
    assert r.token_ids == free


def test_the_row_stops_once_its_phrases_are_said_and_batch_mates_are_unchanged(loaded):
    free = run_alone(Engine(loaded), PROMPTS[3], None, 12)
    stop_at = free[1]
    if stop_at in free[2:8]:
        pytest.skip("the tiny model repeats its stop token")
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(stop_at,),
                            must_include=(((free[7],), (free[7], free[8])),))  # two spellings: either counts
    alone = _run(Engine(loaded), PROMPTS[3], params)
    ids = alone.token_ids
    assert ids[0] == free[0] and ids[1] != stop_at  # held back at the place it would have stopped
    if alone.finish_reason == "stop_sequence":  # it may stop only after saying the phrase
        assert free[7] in ids[:-1]
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    mates = [engine.submit(PROMPTS[k], SamplingParams(max_new_tokens=9, ignore_eos=True)) for k in (0, 2, 4)]
    h = engine.submit(PROMPTS[3], params)
    drive(engine, mates + [h])
    assert h.wait(0).token_ids == ids
    assert [m.wait(0).token_ids for m in mates] == [run_alone(Engine(loaded), PROMPTS[k], None, 9) for k in (0, 2, 4)]


def test_sampler_tracks_phrases_over_tokens():
    p = SamplingParams(max_new_tokens=8, stop_token_ids=(1,), must_include=(((3, 4), (5,)), ((6,),)))
    s = RowSampler.create(p, [0], torch.device("cpu"), frozenset({2}))
    for tok, pending in [(3, 2), (5, 1), (3, 1), (6, 0)]:
        logits = torch.zeros(1, 8)
        logits[0, tok] = 1.0
        logits[0, 1] = logits[0, 2] = 9.0 if pending else -9.0  # the ending ids are the most likely
        assert choose_tokens(logits, [s])[0].token == tok
        assert len(s.pending) == pending
    logits = torch.zeros(1, 8)
    logits[0, 1] = 9.0
    assert choose_tokens(logits, [s])[0].token == 1  # all said: it may end


# a toy vocabulary for the stop "END": ids 0-9 by their own text
TEXTS = ["E", "N", "D", "EN", "ND", "xE", "Dx", "END", "q", "NDE"]


def test_stop_parts_of_a_stop_spread_over_tokens():
    p = StopParts.build("END", TEXTS)
    assert p.enter == {1: {0, 5, 9}, 2: {3}}  # texts ending with "E" / "EN" (never "END" itself: a hold id)
    assert p.extend == {1: {1: 2}}  # "N" after "E": two characters said
    assert p.finish == {1: (4, 9), 2: (2, 6)}  # "ND..." after "E", "D..." after "EN"
    assert p.step(frozenset(), 0) == {1} and p.step(frozenset({1}), 1) == {2} and p.step(frozenset({1}), 8) == set()
    assert p.step(frozenset({1}), 9) == {1}  # "NDE" would finish the stop (masked) and starts it again
    assert StopParts.build("\n\n", ["\n", "a\n", "\nb", "\n\n", "b"]).finish == {1: (0, 2)}


def test_a_pending_phrase_holds_a_stop_spelled_over_two_and_three_tokens():
    """The most likely tokens spell "END" as E+ND, then as E+N+D: while the phrase (id 8) is missing neither may
    complete it; once said, the stop may end the output."""
    p = SamplingParams(max_new_tokens=10, must_include=(((8,),),), stop_parts=(StopParts.build("END", TEXTS),))
    s = RowSampler.create(p, [8], torch.device("cpu"))  # the prompt's phrase does not count

    def pick(*ranked: int) -> int:
        logits = torch.zeros(1, len(TEXTS))
        for rank, tok in enumerate(ranked):
            logits[0, tok] = 10.0 - rank
        return choose_tokens(logits, [s])[0].token

    assert pick(0) == 0 and pick(4, 1) == 1  # "E", then not "ND": "N" (state 2)
    assert pick(2, 6, 3) == 3  # "D" and "Dx" would finish "END": the next best, "EN", starts it again
    assert pick(6, 5) == 5 and pick(9, 3) == 3  # "xE", then not "NDE"
    assert pick(8) == 8 and not s.pending
    assert pick(2) == 2  # said: "EN" + "D" may end the output now


def test_a_phrase_counts_only_within_the_output():
    """The prompt ends with the phrase's first token: the output's first token does not complete it; the output's own
    run does. The repetition penalty's history is the prompt and the output together."""
    p = SamplingParams(max_new_tokens=8, must_include=(((3, 4),),), repetition_penalty=1.5)
    s = RowSampler.create(p, [0, 3], torch.device("cpu"))
    for tok, pending in [(4, 1), (3, 1), (4, 0)]:
        s.observe(tok)
        assert len(s.pending) == pending
    assert s.seen == [0, 3, 4, 3, 4]


def test_validation_and_spellings():
    with pytest.raises(ValueError, match="must_include"):
        SamplingParams(must_include=((),)).validate()
    with pytest.raises(ValueError, match="must_include"):
        SamplingParams(must_include=(((),),)).validate()
    with pytest.raises(ValueError, match="must_include"):
        SamplingParams(must_include=(((1,),),) * 17).validate()
    from tests.tiny import gpt2_tokenizer

    tok = gpt2_tokenizer()
    (spellings,) = phrase_spellings(tok, [["riverside"]])
    assert tuple(tok(" riverside")["input_ids"]) in spellings and tuple(tok("riverside")["input_ids"]) in spellings
