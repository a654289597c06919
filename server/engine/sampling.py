"""Per-request sampling settings and the token chooser.

Every row is processed on its own logits vector with its own `torch.Generator`, so a seeded request draws the
same tokens whatever its batch-mates are. Greedy rows are one batched argmax.

Each row's choice is isolated: whatever values a request carries (within `SamplingParams.validate`) and whatever
logits its row has, a failure (non-finite logits, an impossible draw) ends that row alone, reported in
`Choice.error`; its batch-mates' choices are unaffected. Temperature and truncation are computed on logits shifted
so that their maximum is 0, which cannot overflow whatever the temperature.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20
MAX_MUST_INCLUDE = 16  # phrases a request may require (each with up to MAX_SPELLINGS token spellings)
MAX_SPELLINGS = 32
MIN_TEMPERATURE = 1e-4  # a sampling row below it chooses greedily (the limit of temperature -> 0)
REPETITION_PENALTY_RANGE = (1e-3, 1e3)  # beyond it a penalised logit is meaningless (and can overflow)
LOGPROB_FLOOR = -9999.0  # reported log-probabilities are clamped here (a token of probability 0 is -inf)
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
    # Decoding that keeps facts: the row cannot end (EOS, a stop token, one of `hold_ids`) before each phrase has
    # appeared in its output; `max_new_tokens` still ends it. A phrase is given as its token spellings (any one of
    # them, as a contiguous run of generated ids, counts).
    must_include: tuple[tuple[tuple[int, ...], ...], ...] = ()
    hold_ids: tuple[int, ...] = ()  # more ids that would end the row (tokens whose text holds a stop string)
    stop_parts: tuple[StopParts, ...] = ()  # stop strings spread over several tokens, held back the same way

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        lo, hi = REPETITION_PENALTY_RANGE
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0 and math.isfinite(self.temperature), "must be > 0 and finite"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", lo <= self.repetition_penalty <= hi, f"must be in [{lo:g}, {hi:g}]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2^63)"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            ("must_include", len(self.must_include) <= MAX_MUST_INCLUDE, f"at most {MAX_MUST_INCLUDE} phrases"),
            ("must_include", all(0 < len(p) <= MAX_SPELLINGS and all(p) for p in self.must_include),
             f"every phrase needs 1 to {MAX_SPELLINGS} spellings of at least one token"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ValueError(f"{name}: {msg}")

    @property
    def greedy(self) -> bool:
        """True when no randomness is involved (temperatures below MIN_TEMPERATURE choose greedily)."""
        return not self.do_sample or self.temperature < MIN_TEMPERATURE


@dataclass(eq=False)
class StopParts:
    """One stop string as it can be spelled over several tokens, in ids (each token read by its own text).

    A row that has said the stop's first k characters (k in 1 .. len - 1) is in state k: `enter[k]` are the ids
    whose text ends with those k characters (the stop may start inside them), `extend[k]` maps the ids whose text
    continues the stop from k without completing it to their new state, and `finish[k]` are the ids whose text
    starts with the rest of the stop after k (choosing one completes it). Ids whose own text holds the whole stop
    are `SamplingParams.hold_ids`, not here.
    """

    enter: dict[int, frozenset[int]]
    extend: dict[int, dict[int, int]]
    finish: dict[int, tuple[int, ...]]

    @classmethod
    def build(cls, stop: str, token_texts: list[str]) -> StopParts:
        """The parts of `stop` among `token_texts` (each id's text alone); work linear in the vocabulary times
        the tokens' lengths, whatever the stop's length."""
        size = len(stop)
        enter: dict[int, set[int]] = defaultdict(set)
        extend: dict[int, dict[int, int]] = defaultdict(dict)
        finish: dict[int, list[int]] = defaultdict(list)
        for i, text in enumerate(token_texts):
            n = len(text)
            if not n or stop in text:
                continue
            for k in range(1, min(n, size - 1) + 1):
                if text.endswith(stop[:k]):
                    enter[k].add(i)
            for k in range(max(1, size - n), size):
                if text.startswith(stop[k:]):
                    finish[k].append(i)
            k = stop.find(text, 1)
            while k != -1 and k + n < size:
                extend[k][i] = k + n
                k = stop.find(text, k + 1)
        return cls({k: frozenset(v) for k, v in enter.items()}, dict(extend),
                   {k: tuple(v) for k, v in finish.items()})

    def step(self, states: frozenset[int], token: int) -> frozenset[int]:
        """The states after choosing `token` in `states`."""
        moved = {self.extend[k][token] for k in states if token in self.extend.get(k, ())}
        return frozenset(moved.union(k for k, ids in self.enter.items() if token in ids))


def phrase_spellings(tokenizer, phrases: list[list[str]]) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """`SamplingParams.must_include` from phrases (each a list of alternatives): every alternative as it tokenises
    alone and after a space, without special tokens."""
    out = []
    for alternatives in phrases:
        forms = {tuple(tokenizer(v, add_special_tokens=False)["input_ids"]) for a in alternatives for v in (a, " " + a)}
        out.append(tuple(sorted(f for f in forms if f)))
    return tuple(out)


@dataclass
class RowSampler:
    """The sampling state of one running row."""

    params: SamplingParams
    generator: torch.Generator | None = None
    seen: list[int] = field(default_factory=list)  # prompt + chosen ids, kept while the penalty or a phrase needs them
    pending: list[tuple[tuple[int, ...], ...]] = field(default_factory=list)  # must_include phrases not yet seen
    held: torch.Tensor | None = None  # ids that would end the row, masked while a phrase is pending
    prompt_len: int = 0  # where the output starts in `seen` (a phrase counts only within the output)
    partial: list[frozenset[int]] = field(default_factory=list)  # per stop part: how much of the stop ends the text

    def ending_ids(self, device: torch.device) -> torch.Tensor | None:
        """The ids masked while a phrase is pending: `held`, and those that would complete a stop string the
        output has started."""
        more = sorted({i for p, states in zip(self.params.stop_parts, self.partial) for k in states
                       for i in p.finish.get(k, ())})
        if not more:
            return self.held
        extra = torch.tensor(more, dtype=torch.long, device=device)
        return extra if self.held is None else torch.cat([self.held, extra])

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], device: torch.device,
               eos_token_ids: frozenset[int] = frozenset()) -> RowSampler:
        """Make a row's sampler; a seeded generator only when the row samples. `eos_token_ids`: the engine's,
        held back (with the stop and hold ids) while a must_include phrase is pending."""
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed() % 2**63)
        held = None
        if params.must_include:
            ids = set(params.stop_token_ids) | set(params.hold_ids) | (set() if params.ignore_eos else eos_token_ids)
            held = torch.tensor(sorted(ids), dtype=torch.long, device=device) if ids else None
        keep = params.repetition_penalty != 1.0 or bool(params.must_include)
        partial = [frozenset()] * len(params.stop_parts) if params.must_include else []
        return cls(params, gen, list(prompt_ids) if keep else [], list(params.must_include), held, len(prompt_ids),
                   partial)

    def observe(self, token: int) -> None:
        """Note a chosen token: the repetition penalty's history, and which must_include phrases it completes."""
        if self.params.repetition_penalty == 1.0 and not self.pending:
            return
        s = self.seen
        s.append(token)
        if self.pending:
            self.partial = [p.step(states, token) for p, states in zip(self.params.stop_parts, self.partial)]
            n = len(s) - self.prompt_len
            self.pending = [p for p in self.pending if not any(len(sp) <= n and tuple(s[-len(sp):]) == sp
                                                               for sp in p)]
            if not self.pending and self.params.repetition_penalty == 1.0:
                self.seen = []  # nothing reads it any more


@dataclass
class Choice:
    """What one row chose: a token and its log-probability, or the error that ends the row."""

    token: int = -1
    logprob: float = 0.0
    top: Top = ()
    error: str | None = None


class SamplingError(ValueError):
    """A row's logits or settings admit no token."""


def _penalise(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """HF's repetition penalty on one row: divide positive, multiply negative logits of seen tokens."""
    if not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    vals = logits.gather(0, idx)
    vals = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits.scatter(0, idx, vals)


def _sample_row(logits: torch.Tensor, s: RowSampler) -> int:
    """Temperature, top-k, top-p, then a draw from the row's own generator.

    The logits are shifted to a maximum of 0 before the temperature divides them (no overflow at any temperature),
    and the most likely token always survives truncation (top-p keeps at least one token however small it is).
    """
    p = s.params
    x = (logits.double() - logits.max().double()) / p.temperature  # [V], max 0
    if p.top_k and p.top_k < x.shape[0]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(0)
        drop = probs.cumsum(0) - probs >= p.top_p  # keep the smallest set whose mass reaches top_p
        drop[0] = False
        x = x.scatter(0, order, sorted_x.masked_fill(drop, -math.inf))
    probs = x.softmax(0)
    if not torch.isfinite(probs).all():
        raise SamplingError("the row's logits are not finite")
    return int(torch.multinomial(probs, 1, generator=s.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[Choice]:
    """Pick one token per row from logits [n, V]: each row's token, its log-probability, and its `top_logprobs`
    most likely tokens (empty for rows that did not ask); a row that cannot choose gets `error` instead.

    Log-probabilities are of the distribution the row chooses from before temperature and truncation: the model's
    own (after the repetition penalty, and with the ending tokens removed while a must_include phrase is pending),
    as TGI's details and OpenAI's logprobs report them, clamped at LOGPROB_FLOOR.
    """
    logits = logits.float()
    penalised = [i for i, s in enumerate(samplers) if s.params.repetition_penalty != 1.0]
    ending = {i: s.ending_ids(logits.device) for i, s in enumerate(samplers) if s.pending}
    holding = [i for i, ids in ending.items() if ids is not None]
    if penalised or holding:
        logits = logits.clone()
        for i in penalised:
            logits[i] = _penalise(logits[i], samplers[i].seen, samplers[i].params.repetition_penalty)
        for i in holding:  # a phrase the row must say is still missing: it may not end yet
            logits[i, ending[i]] = -math.inf
    tokens = logits.argmax(dim=-1).tolist()
    choices = [Choice() for _ in samplers]
    for i, s in enumerate(samplers):
        if not s.params.greedy:
            try:
                tokens[i] = _sample_row(logits[i], s)
            except (RuntimeError, SamplingError) as e:  # this row alone
                choices[i].error = f"sampling failed: {e}"
    logsoftmax = torch.log_softmax(logits, dim=-1)
    logprobs = logsoftmax.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    for i, (s, c) in enumerate(zip(samplers, choices)):
        if c.error:
            continue
        if math.isnan(logprobs[i]):
            c.error = "the model's logits for this row are not finite"
            continue
        c.token, c.logprob = tokens[i], max(logprobs[i], LOGPROB_FLOOR)
        if s.params.top_logprobs:
            vals, ids = logsoftmax[i].topk(s.params.top_logprobs)
            c.top = tuple((t, max(v, LOGPROB_FLOOR)) for t, v in zip(ids.tolist(), vals.tolist()))
        s.observe(c.token)
    return choices
