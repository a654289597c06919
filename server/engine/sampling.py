"""Per-request sampling settings and the token chooser.

Every row is processed on its own logits vector with its own `torch.Generator`, so a seeded request draws the
same tokens whatever its batch-mates are. Greedy rows are one batched argmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20
Top = tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


@dataclass
class SamplingParams:
    """How one request chooses its tokens (TGI's parameter names)."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0  # also return the n most likely tokens and their log-probabilities at each step

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0 and math.isfinite(self.temperature), "must be > 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             "must be > 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2^63)"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"must be in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ValueError(f"{name} {msg}")

    @property
    def greedy(self) -> bool:
        """True when no randomness is involved."""
        return not self.do_sample


@dataclass
class RowSampler:
    """The sampling state of one running row."""

    params: SamplingParams
    generator: torch.Generator | None = None
    seen: list[int] = field(default_factory=list)  # prompt + generated ids, for the repetition penalty

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], device: torch.device) -> RowSampler:
        """Make a row's sampler; a seeded generator only when the row samples."""
        gen = None
        if params.do_sample:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed() % 2**63)
        return cls(params, gen, list(prompt_ids) if params.repetition_penalty != 1.0 else [])


def _penalise(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """HF's repetition penalty on one row: divide positive, multiply negative logits of seen tokens."""
    if not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    vals = logits.gather(0, idx)
    vals = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits.scatter(0, idx, vals)


def _sample_row(logits: torch.Tensor, s: RowSampler) -> int:
    """Temperature, top-k, top-p, then a draw from the row's own generator."""
    p = s.params
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(0).cumsum(0)
        drop = cum - sorted_logits.softmax(0) >= p.top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(0)
    return int(torch.multinomial(probs, 1, generator=s.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> tuple[list[int], list[float], list[Top]]:
    """Pick one token per row from logits [n, V]; return the ids, their log-probabilities, and each row's
    `top_logprobs` most likely tokens (empty for rows that did not ask).

    Log-probabilities are of the distribution the row chooses from before temperature and truncation: the model's
    own (after the repetition penalty), as TGI's details and OpenAI's logprobs report them.
    """
    logits = logits.float()
    penalised = [i for i, s in enumerate(samplers) if s.params.repetition_penalty != 1.0]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            logits[i] = _penalise(logits[i], samplers[i].seen, samplers[i].params.repetition_penalty)
    tokens = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(samplers):
        if s.params.do_sample:
            tokens[i] = _sample_row(logits[i], s)
    logsoftmax = torch.log_softmax(logits, dim=-1)
    logprobs = logsoftmax.gather(1, torch.tensor(tokens, device=logits.device)[:, None])
    tops: list[Top] = [() for _ in samplers]
    for i, s in enumerate(samplers):
        if s.params.top_logprobs:
            vals, ids = logsoftmax[i].topk(s.params.top_logprobs)
            tops[i] = tuple(zip(ids.tolist(), vals.tolist()))
    for i in penalised:
        samplers[i].seen.append(tokens[i])
    return tokens, logprobs[:, 0].tolist(), tops
