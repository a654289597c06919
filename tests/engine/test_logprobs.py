"""Per-token top log-probabilities (TGI's top_n_tokens, OpenAI's logprobs): equal to the model's own log-softmax,
whatever the batch-mates, and only for the rows that asked."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from server.engine.engine import Engine, EngineConfig
from server.engine.sampling import SamplingParams
from tests.engine.test_exactness import PROMPTS, device_prefix
from tests.tiny import tiny_model


def reference_steps(kind: str, adapter_dir: str, prompt: list[int], n: int, k: int):
    """Greedy decoding with PEFT, recomputing the whole sequence each step: (token, logprob, top-k) per step."""
    model = PeftModel.from_pretrained(tiny_model(kind), adapter_dir).eval()
    ids, steps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            lsm = torch.log_softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float(), -1)
            vals, top = lsm.topk(k)
            steps.append((int(top[0]), float(vals[0]), list(zip(top.tolist(), vals.tolist()))))
            ids.append(int(top[0]))
    return steps


def run(engine: Engine, jobs):
    handles = [engine.submit(p, sp, px) for p, sp, px in jobs]
    while not all(h.done for h in handles):
        engine.step()
    return handles


def test_top_logprobs_equal_the_models_log_softmax_alone_and_in_a_batch(kind, loaded, adapters):
    name, path = next(iter(adapters.items()))
    prefix = device_prefix(path, loaded)
    want = reference_steps(kind, path, PROMPTS[1], 6, k=5)
    ask = SamplingParams(max_new_tokens=6, ignore_eos=True, top_logprobs=5)
    others = [(PROMPTS[i], SamplingParams(max_new_tokens=3 + i, ignore_eos=True), device_prefix(p, loaded))
              for i, p in enumerate(list(adapters.values())[1:])]
    alone = run(Engine(loaded), [(PROMPTS[1], ask, prefix)])[0]
    mixed = run(Engine(loaded, EngineConfig(max_batch_size=8)), [others[0], (PROMPTS[1], ask, prefix), *others[1:]])
    for handle in (alone, mixed[1]):
        got = handle.events
        assert [e.token_id for e in got] == [t for t, _, _ in want]
        for ev, (tok, lp, top) in zip(got, want):
            assert ev.logprob == pytest.approx(lp, abs=1e-4)
            assert [i for i, _ in ev.top] == [i for i, _ in top]  # same tokens, most likely first
            assert [v for _, v in ev.top] == pytest.approx([v for _, v in top], abs=1e-4)
            assert ev.top[0] == (ev.token_id, pytest.approx(ev.logprob))  # greedy: the chosen token is the top one
    assert all(e.top == () for h in (mixed[0], *mixed[2:]) for e in h.events), "rows that did not ask get none"


@pytest.mark.parametrize("n", [-1, 21])
def test_top_logprobs_out_of_range_is_refused(loaded, n):
    with pytest.raises(ValueError, match=r"top_logprobs: must be in \[0, 20\]"):
        Engine(loaded).submit(PROMPTS[0], SamplingParams(top_logprobs=n))
