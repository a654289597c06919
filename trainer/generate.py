"""Decoding for evaluation: greedy and beam search, with an optional KV prefix served as the engine serves it.

Many inputs at a time (`search_many`: each input's beams, and the inputs of a batch, share each forward pass). The
prefix sits at cache positions 0..P-1 and the prompt starts at position P, exactly as in training and in the
server. The search is shared with BART (`trainer.seq2seq.Seq2SeqSteps`); only the per-step forward differs.
"""
from __future__ import annotations

from typing import Callable, Generator, Protocol

import torch
from torch import nn

from trainer.methods import prefix_cache


def _last_logp(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """Run ids [n, L] at positions `pos` [n, L], attending where `mask` [n, cached + L] is 1, extending `cache`;
    return the last position's log-probs [n, V] (float32)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


class Steps(Protocol):
    """The decoding state of a batch of inputs for `search_many`: the first log-probs, then one token per row."""

    def start_logp(self) -> torch.Tensor:
        """Log-probs of each input's first generated token [n, V]."""

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Log-probs [m, V] after appending tokens[i] to row i."""

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from old row rows[i] (called before `step`; rows may be kept, duplicated or dropped)."""


class CausalSteps:
    """Steps for a decoder-only model: each prompt after the prefix, then one token per row. Prompts are
    left-padded after the prefix (masked, at their own positions: the prefix at 0..P-1, each prompt from P, as
    served), so every row's next token sits in the same column."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], kv: torch.Tensor | None):
        from transformers import DynamicCache

        self.model = model
        dev = self.dev = next(model.parameters()).device
        n, longest = len(prompts), max(len(q) for q in prompts)
        p = 0 if kv is None else kv.shape[3]
        self.ids = torch.zeros(n, longest, dtype=torch.long, device=dev)
        self.mask = torch.zeros(n, p + longest, dtype=torch.long, device=dev)
        self.pos = torch.full((n, longest), p, dtype=torch.long, device=dev)
        self.mask[:, :p] = 1
        for i, q in enumerate(prompts):
            self.ids[i, longest - len(q):] = torch.tensor(q, device=dev)
            self.mask[i, p + longest - len(q):] = 1
            self.pos[i, longest - len(q):] = torch.arange(p, p + len(q), device=dev)
        self.cache = prefix_cache(model, kv.to(dev), n) if kv is not None else DynamicCache(config=model.config)
        self.nxt = torch.tensor([p + len(q) for q in prompts], device=dev)  # each row's next position

    def start_logp(self) -> torch.Tensor:
        """Log-probs of each prompt's first generated token [n, V]."""
        return _last_logp(self.model, self.ids, self.mask, self.pos, self.cache)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Log-probs [m, V] after appending one token to each row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        logp = _last_logp(self.model, torch.tensor(tokens, device=self.dev)[:, None], self.mask, self.nxt[:, None],
                          self.cache)
        self.nxt = self.nxt + 1
        return logp

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep / duplicate / drop rows: the cache, masks and positions follow."""
        self.cache.reorder_cache(rows)
        self.mask, self.nxt = self.mask[rows], self.nxt[rows]


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], kv: torch.Tensor | None, stop_ids: set[int],
             num_beams: int = 1, max_new_tokens: int = 64, length_penalty: float = 1.0) -> list[int]:
    """Generated token ids (stop token excluded). num_beams=1 is greedy; beams are ranked by logprob/len**lp."""
    return generate_many(model, [prompt_ids], kv, stop_ids, num_beams, max_new_tokens, length_penalty)[0]


def _search(logp: torch.Tensor, stop_ids: set[int], num_beams: int, max_new_tokens: int,
            length_penalty: float) -> Generator[tuple[list[int], list[int]], torch.Tensor, list[int]]:
    """One input's beam search from its first log-probs [1, V], as a generator: it yields (beams, tokens), beam i
    continuing from old beam beams[i] with tokens[i], is sent the log-probs [n, V] after that step, and returns the
    best sequence (stop token excluded; beams ranked by logprob / len ** length_penalty). `search_many` drives one
    per input, their steps sharing forward passes."""
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


def search_many(make_steps: Callable[[list[list[int]]], Steps], inputs: list[list[int]], stop_ids: set[int],
                num_beams: int = 1, max_new_tokens: int = 64, length_penalty: float = 1.0, batch_size: int = 16,
                progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Each input's beam search (`_search`), `batch_size` inputs at a time: `make_steps(batch)` builds the batch's
    `Steps` (decoder-only or BART), the beams of every live input share one `step` per step, finished inputs leave
    the batch, and each input gets the result it gets alone. `progress(n)` is called as inputs finish."""
    out: list[list[int]] = []
    for i in range(0, len(inputs), batch_size):
        out += _search_batch(make_steps(inputs[i:i + batch_size]), stop_ids, num_beams, max_new_tokens,
                             length_penalty, progress)
    return out


def _search_batch(steps: Steps, stop_ids: set[int], num_beams: int, max_new_tokens: int, length_penalty: float,
                  progress: Callable[[int], None] | None) -> list[list[int]]:
    """`search_many` for the inputs of one batch of `steps`."""
    logp = steps.start_logp()  # [n, V]
    n = logp.shape[0]
    results: dict[int, list[int]] = {}
    searches, asks, rows = {}, {}, {}  # live inputs: their search, its (beams, tokens), their rows in the batch
    for i in range(n):
        searches[i] = _search(logp[i:i + 1], stop_ids, num_beams, max_new_tokens, length_penalty)
        rows[i] = [i]
        _advance(searches, asks, results, i, None, progress)
    while asks:
        index, tokens, where = [], [], {}
        for i, (beams, toks) in asks.items():
            where[i] = (len(index), len(index) + len(beams))
            index += [rows[i][b] for b in beams]
            tokens += toks
        steps.reorder(torch.tensor(index, device=logp.device))
        logp = steps.step(tokens)
        for i in list(asks):
            a, b = where[i]
            rows[i] = list(range(a, b))
            _advance(searches, asks, results, i, logp[a:b], progress)
    return [results[i] for i in range(n)]


@torch.no_grad()
def generate_many(model: nn.Module, prompts: list[list[int]], kv: torch.Tensor | None, stop_ids: set[int],
                  num_beams: int = 1, max_new_tokens: int = 64, length_penalty: float = 1.0,
                  batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """`generate` for many prompts, `batch_size` inputs at a time: each input's beam search as `generate` runs it,
    but the beams of all inputs in a batch share one forward pass per step (on a CPU a 135M model's step costs
    about the same for 5 rows as for 80). `progress(n)` is called as inputs finish."""
    return search_many(lambda batch: CausalSteps(model, batch, kv), prompts, stop_ids, num_beams, max_new_tokens,
                       length_penalty, batch_size, progress)


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
