"""Evaluation: greedy decoding through the engine equals the trainer's own decoding; SER, TER and groups."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.data import Example
from trainer.evaluate import decode_greedy, evaluate
from trainer.generate import generate, generate_many, stop_token_ids
from trainer.metrics import corpus_ter

E2E = [Example("name : Alpha | Type : pub | food : French", "Alpha is a French pub.", "seen"),
       Example("name : Alpha | Type : pub | food : French", "Alpha serves French food.", "seen"),
       Example("name : Beta | area : riverside", "Beta is by the river.", "unseen")]


def _prefix(loaded, length: int = 3) -> torch.Tensor:
    s = loaded.spec
    torch.manual_seed(1)
    return torch.randn(s.num_layers, 2, s.num_kv_heads, length, s.head_dim)  # [layers, 2, kv_heads, P, head_dim]


def test_engine_greedy_equals_the_trainers_greedy_decoding(make_model):
    loaded = make_model("llama")
    tok = loaded.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("name : Alpha\n", "a longer prompt than the first one\n", "x\n")]
    stops = stop_token_ids(tok)
    for kv in (None, _prefix(loaded)):
        alone = [generate(loaded.model, p, kv, stops, 1, 12) for p in prompts]
        assert decode_greedy(loaded, prompts, kv, stops, 12, max_batch_size=2, progress=False) == alone


def test_evaluate_scores_slots_ter_and_groups(make_model, tmp_path):
    loaded = make_model("llama")
    r = evaluate(loaded, loaded.model, _prefix(loaded), E2E, num_beams=1, max_new_tokens=6, progress=False,
                 use_java=False, out=tmp_path)
    assert r["inputs"] == 2 and {"BLEU", "SER"} <= set(r["metrics"]) and "TER" not in r["metrics"]
    # a random model writes none of the five values: all missing
    assert r["slot_errors"]["values"] == 5 and r["metrics"]["SER"] >= 0.8
    assert set(r["groups"]) == {"seen", "unseen"} and r["groups"]["seen"]["inputs"] == 1
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert "name" in rows[0]["slot_errors"]["missing"] or "name" not in rows[0]["output"]
    beam = evaluate(loaded, loaded.model, None, E2E, num_beams=2, max_new_tokens=4, progress=False, use_java=False)
    assert beam["num_beams"] == 2 and "SER" in beam["metrics"]


def test_non_e2e_inputs_have_no_slot_error_rate(make_model):
    loaded = make_model("llama")
    ex = [Example("Alan Bean : occupation : Test pilot", "Alan Bean was a test pilot.")]
    r = evaluate(loaded, loaded.model, None, ex, num_beams=1, max_new_tokens=4, progress=False, use_java=False)
    assert "SER" not in r["metrics"] and "slot_errors" not in r and "groups" not in r and "TER" in r["metrics"]


def test_ter_counts_edits_against_the_closest_reference():
    assert corpus_ter(["a b c d"], [["a b c d"]]) == 0.0
    assert corpus_ter(["a b c d"], [["A B X D", "q r s t"]]) == 0.25  # one substitution in four words, any case


def test_mr_phrases_give_one_phrase_list_per_attribute():
    from trainer.slots import mr_phrases

    ph = mr_phrases("name : The Eagle | Type : pub | food : Fast food | price : less than £20 | "
                    "customer rating : 5 out of 5 | area : riverside | family friendly : no | near : Burger King")
    assert ph[0] == ["The Eagle"] and ph[1] == ["pub"] and ph[2] == ["Fast food", "fast food"]
    assert "cheap" in ph[3] and "less than £20" in ph[3]  # the numeric and word forms of one scale point
    assert "5 out of 5" in ph[4] and "riverside" in ph[5] and "not family" in ph[6] and ph[7] == ["Burger King"]
    assert all(1 <= len(p) <= 8 for p in ph)  # the server's limit of alternatives


def test_must_include_holds_the_stop_until_the_mr_is_said(make_model):
    loaded = make_model("llama")
    tok = loaded.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("name : Alpha | food : French\n", "name : Beta | area : riverside\n")]
    stops = stop_token_ids(tok) | set(range(0, loaded.spec.vocab_size, 2))  # half the vocabulary ends a row
    free = decode_greedy(loaded, prompts, None, stops, 8, progress=False)
    assert any(len(ids) < 8 for ids in free)  # the even ids end the unconstrained rows early
    phrases = [[["zebra quantum"]], [["zebra quantum"], ["riverside"]]]  # never said by a random model
    held = decode_greedy(loaded, prompts, None, stops, 8, progress=False, must_include=phrases)
    assert all(len(ids) == 8 and not stops & set(ids) for ids in held)
    r = evaluate(loaded, loaded.model, None, E2E, num_beams=1, max_new_tokens=4, progress=False, use_java=False,
                 must_include=True)
    assert r["must_include"] is True
    with pytest.raises(ValueError, match="greedy"):
        evaluate(loaded, loaded.model, None, E2E, num_beams=2, max_new_tokens=4, progress=False, use_java=False,
                 must_include=True)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_beam_search_equals_one_input_at_a_time(make_model, kind):
    """generate_many shares each step's forward pass between the beams of several inputs (left-padded prompts
    after the prefix): every input's output is the one `generate` gives it alone, for any batch size."""
    loaded = make_model(kind)
    tok = loaded.tokenizer
    texts = ("name : Alpha\n", "a longer prompt than the first one, with more words\n", "x\n", "name : B | food : F\n",
             "the fifth\n")
    prompts = [tok(t)["input_ids"] for t in texts]
    for kv in (None, _prefix(loaded)):
        free = [generate(loaded.model, p, kv, set(), 1, 10) for p in prompts]
        # tokens the model writes early for some inputs, and half the vocabulary (a near-uniform random model's
        # beams must meet stops to finish early): inputs finish apart
        stops = {free[0][2], free[3][5]} | set(range(0, len(tok), 2))
        for beams in (1, 3):
            alone = [generate(loaded.model, p, kv, stops, beams, 10) for p in prompts]
            assert len({len(a) for a in alone}) > 1, (free, alone)  # finished inputs leave the batch early
            for batch_size in (1, 2, 5):
                done = []
                got = generate_many(loaded.model, prompts, kv, stops, beams, 10, batch_size=batch_size,
                                    progress=done.append)
                assert got == alone, (kv is None, beams, batch_size)
                assert sum(done) == len(prompts)
