"""Log-probabilities in the shapes clients expect: TGI's `top_tokens`, OpenAI completions' `logprobs` (the legacy
per-choice object) and chat completions' `logprobs.content`.

The engine returns, per generated token, its log-probability and (when asked) the most likely tokens at that step
with theirs (`TokenOut.top`); this module only formats them. Log-probabilities are of the model's distribution
before temperature and top-k/top-p (TGI and vLLM report the same).
"""
from __future__ import annotations

from typing import Any

from server.api.errors import validation
from server.api.text import IncrementalDecoder
from server.engine.sampling import MAX_TOP_LOGPROBS

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's cap for /v1/completions' `logprobs`


def completion_top(logprobs: Any) -> int | None:
    """/v1/completions' `logprobs` (an integer 0..5, or null): how many alternatives per token; None = none."""
    if logprobs is None or logprobs is False:
        return None
    if isinstance(logprobs, float) and logprobs.is_integer():  # 4.0 is an integer to JSON (Schema)
        logprobs = int(logprobs)
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise validation(f"logprobs: must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] or null")
    return logprobs


def chat_top(logprobs: Any, top_logprobs: int | None) -> int | None:
    """/v1/chat/completions' `logprobs` (bool) and `top_logprobs` (0..20, needs logprobs): alternatives, or None."""
    if logprobs not in (None, True, False):
        raise validation("logprobs: must be true, false or null")
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise validation(f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}]")
    if not logprobs:
        if top_logprobs:
            raise validation("top_logprobs: needs logprobs: true")
        return None
    return top_logprobs or 0


def tgi_top_tokens(decoder: IncrementalDecoder, top: tuple[tuple[int, float], ...]) -> list[dict[str, Any]]:
    """TGI's `top_tokens` of one step: [{id, text, logprob, special}], most likely first."""
    return [{"id": i, "text": decoder.token_text(i), "logprob": lp, "special": i in decoder.special} for i, lp in top]


def completion_logprobs(decoder: IncrementalDecoder, tokens: list, offset: int) -> dict[str, Any]:
    """OpenAI completions' choice `logprobs`: tokens, token_logprobs, top_logprobs (one {text: logprob} per token,
    the chosen token included) and text_offset (character offset of each token in the choice's text)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        alternatives = {decoder.token_text(i): lp for i, lp in t.top}
        alternatives.setdefault(t.text, t.logprob)
        out["tokens"].append(t.text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(alternatives)
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def _chat_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(decoder: IncrementalDecoder, tokens: list) -> dict[str, Any]:
    """OpenAI chat's choice `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [...]}], refusal: null}."""
    content = [{**_chat_entry(t.text, t.logprob),
                "top_logprobs": [_chat_entry(decoder.token_text(i), lp) for i, lp in t.top]} for t in tokens]
    return {"content": content, "refusal": None}
