"""Decoding for evaluation: greedy and beam search, with an optional KV prefix served as the engine serves it.

One input at a time (beam search runs its beams as the batch). The prefix sits at cache positions 0..P-1 and the
prompt starts at position P, exactly as in training and in the server. `beam_search` is shared with BART
(`trainer.seq2seq.Seq2SeqSteps`); only the per-step forward differs.
"""
from __future__ import annotations

from typing import Callable, Generator, Protocol

import torch
from torch import nn

from trainer.methods import prefix_cache


def _step(model: nn.Module, ids: torch.Tensor, cache, start: int, total: int) -> torch.Tensor:
    """Run ids [n, L] at positions start.. with `total` attended positions; return last log-probs [n, V]."""
    n, length = ids.shape
    pos = torch.arange(start, start + length, device=ids.device).unsqueeze(0).expand(n, -1)  # [n, L]
    return _last_logp(model, ids, torch.ones(n, total, dtype=torch.long, device=ids.device), pos, cache)


def _last_logp(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """Run ids [n, L] at positions `pos` [n, L], attending where `mask` [n, cached + L] is 1, extending `cache`;
    return the last position's log-probs [n, V] (float32)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


class Steps(Protocol):
    """One input's decoding state for `beam_search`: the first log-probs, one step per beam, beam reordering."""

    def start_logp(self) -> torch.Tensor:
        """Log-probs of the first generated token [1, V]."""

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Log-probs [n, V] after appending tokens[i] to beam i."""

    def reorder(self, beams: torch.Tensor) -> None:
        """Beam i continues from old beam beams[i] (called before `step`)."""


class CausalSteps:
    """Beam-search steps for a decoder-only model: the prompt after the prefix, then one token per beam."""

    def __init__(self, model: nn.Module, prompt_ids: list[int], kv: torch.Tensor | None):
        from transformers import DynamicCache

        self.model = model
        self.dev = next(model.parameters()).device
        self.p = 0 if kv is None else kv.shape[3]
        self.cache = prefix_cache(model, kv.to(self.dev), 1) if kv is not None else DynamicCache(config=model.config)
        self.prompt = prompt_ids
        self.cur = self.p + len(prompt_ids)

    def start_logp(self) -> torch.Tensor:
        """Log-probs of the first generated token [1, V]."""
        return _step(self.model, torch.tensor([self.prompt], device=self.dev), self.cache, self.p, self.cur)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Log-probs [n, V] after appending one token to each beam."""
        self.cur += 1
        return _step(self.model, torch.tensor(tokens, device=self.dev)[:, None], self.cache, self.cur - 1, self.cur)

    def reorder(self, beams: torch.Tensor) -> None:
        """Keep / duplicate beams."""
        self.cache.reorder_cache(beams)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], kv: torch.Tensor | None, stop_ids: set[int],
             num_beams: int = 1, max_new_tokens: int = 64, length_penalty: float = 1.0) -> list[int]:
    """Generated token ids (stop token excluded). num_beams=1 is greedy; beams are ranked by logprob/len**lp."""
    return beam_search(CausalSteps(model, prompt_ids, kv), stop_ids, num_beams, max_new_tokens, length_penalty)


def beam_search(steps: Steps, stop_ids: set[int], num_beams: int = 1, max_new_tokens: int = 64,
                length_penalty: float = 1.0) -> list[int]:
    """Greedy (num_beams=1) or beam search over `steps` (start_logp(), step(tokens), reorder(beams))."""
    logp = steps.start_logp()
    search = _search(logp, stop_ids, num_beams, max_new_tokens, length_penalty)
    try:
        beams, tokens = next(search)
        while True:
            steps.reorder(torch.tensor(beams, device=logp.device))
            beams, tokens = search.send(steps.step(tokens))
    except StopIteration as done:
        return done.value


def _search(logp: torch.Tensor, stop_ids: set[int], num_beams: int, max_new_tokens: int,
            length_penalty: float) -> Generator[tuple[list[int], list[int]], torch.Tensor, list[int]]:
    """One input's beam search from its first log-probs [1, V], as a generator: it yields (beams, tokens), beam i
    continuing from old beam beams[i] with tokens[i], is sent the log-probs [n, V] after that step, and returns the
    best sequence (stop token excluded; beams ranked by logprob / len ** length_penalty). `beam_search` drives it
    for one input, `generate_many` for a batch of inputs whose steps share forward passes."""
    dev = logp.device
    seqs: list[list[int]] = [[]]
    scores = torch.zeros(1, device=dev)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_new_tokens):
        cand = (scores[:, None] + logp).flatten()  # [n * V]
        top_s, top_i = cand.topk(min(2 * num_beams, cand.numel()))
        vocab = logp.shape[1]
        keep_beam, keep_tok, keep_s = [], [], []
        for s, i in zip(top_s.tolist(), top_i.tolist()):
            beam, tok = divmod(i, vocab)
            if tok in stop_ids:
                finished.append((s / max(len(seqs[beam]) + 1, 1) ** length_penalty, seqs[beam]))
                if num_beams == 1:
                    break
            else:
                keep_beam.append(beam), keep_tok.append(tok), keep_s.append(s)
            if len(keep_beam) == num_beams:
                break
        if num_beams == 1 and finished:
            break
        if len(finished) >= num_beams:
            best_alive = max(keep_s) / (len(seqs[0]) + 1) ** length_penalty if keep_s else float("-inf")
            if best_alive < sorted(f[0] for f in finished)[-num_beams]:
                break
        if not keep_beam:
            break
        seqs = [seqs[b] + [t] for b, t in zip(keep_beam, keep_tok)]
        scores = torch.tensor(keep_s, device=dev)
        logp = yield keep_beam, keep_tok
    else:  # length limit: unfinished beams compete with the finished ones
        finished += [(s / max(len(q), 1) ** length_penalty, q) for s, q in zip(scores.tolist(), seqs)]
    return max(finished, key=lambda f: f[0])[1] if finished else seqs[0]


@torch.no_grad()
def generate_many(model: nn.Module, prompts: list[list[int]], kv: torch.Tensor | None, stop_ids: set[int],
                  num_beams: int = 1, max_new_tokens: int = 64, length_penalty: float = 1.0,
                  batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """`generate` for many prompts, `batch_size` inputs at a time: each input's beam search as `generate` runs it,
    but the beams of all inputs in a batch share one forward pass per step (on a CPU a 135M model's step costs
    about the same for 5 rows as for 80). Prompts are left-padded after the prefix (masked, at their own
    positions: the prefix at 0..P-1, each prompt from P, as served). `progress(n)` is called as inputs finish."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        out += _generate_batch(model, prompts[i:i + batch_size], kv, stop_ids, num_beams, max_new_tokens,
                               length_penalty, progress)
    return out


def _generate_batch(model: nn.Module, prompts: list[list[int]], kv: torch.Tensor | None, stop_ids: set[int],
                    num_beams: int, max_new_tokens: int, length_penalty: float,
                    progress: Callable[[int], None] | None) -> list[list[int]]:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    n, longest = len(prompts), max(len(q) for q in prompts)
    p = 0 if kv is None else kv.shape[3]
    ids = torch.zeros(n, longest, dtype=torch.long, device=dev)  # left-padded: every prompt ends at column L-1
    mask = torch.zeros(n, p + longest, dtype=torch.long, device=dev)
    pos = torch.full((n, longest), p, dtype=torch.long, device=dev)
    mask[:, :p] = 1
    for i, q in enumerate(prompts):
        ids[i, longest - len(q):] = torch.tensor(q, device=dev)
        mask[i, p + longest - len(q):] = 1
        pos[i, longest - len(q):] = torch.arange(p, p + len(q), device=dev)
    cache = prefix_cache(model, kv.to(dev), n) if kv is not None else DynamicCache(config=model.config)
    logp = _last_logp(model, ids, mask, pos, cache)  # [n, V]
    nxt = [p + len(q) for q in prompts]  # each input's next position
    results: dict[int, list[int]] = {}
    searches, asks, rows = {}, {}, {}  # live inputs: their search, its (beams, tokens), their rows in the batch
    for i in range(n):
        searches[i] = _search(logp[i:i + 1], stop_ids, num_beams, max_new_tokens, length_penalty)
        rows[i] = [i]
        _advance(searches, asks, results, i, None, progress)
    while asks:
        index, tokens, where, positions = [], [], {}, []
        for i, (beams, toks) in asks.items():
            where[i] = (len(index), len(index) + len(beams))
            index += [rows[i][b] for b in beams]
            tokens += toks
            positions += [nxt[i]] * len(beams)
        sel = torch.tensor(index, device=dev)
        cache.reorder_cache(sel)  # keeps, duplicates and drops rows (finished inputs leave the batch)
        mask = torch.cat([mask[sel], mask.new_ones(len(index), 1)], dim=1)
        logp = _last_logp(model, torch.tensor(tokens, device=dev)[:, None], mask,
                          torch.tensor(positions, device=dev)[:, None], cache)
        for i in list(asks):
            a, b = where[i]
            rows[i], nxt[i] = list(range(a, b)), nxt[i] + 1
            _advance(searches, asks, results, i, logp[a:b], progress)
    return [results[i] for i in range(n)]


def _advance(searches: dict, asks: dict, results: dict, i: int, logp: torch.Tensor | None,
             progress: Callable[[int], None] | None) -> None:
    """Send input i's search its log-probs (None: start it); note its next request, or its result once done."""
    try:
        asks[i] = next(searches[i]) if logp is None else searches[i].send(logp)
    except StopIteration as done:
        results[i] = done.value
        asks.pop(i, None)
        del searches[i]
        if progress is not None:
            progress(1)


def stop_token_ids(tokenizer) -> set[int]:
    """EOS plus every token whose text contains a newline (outputs are one line)."""
    ids = {i for t, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([t])}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
