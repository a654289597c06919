"""Request and response bodies of the TGI/LoRAX routes. Unknown fields are ignored and null means the default,
because the `text-generation` and `lorax-client` packages send every field they know."""
from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prefix_store.base import TASK_NAME, TENANT_NAME, VERSION
from server.api.errors import validation
from server.engine.sampling import MAX_MUST_INCLUDE, MAX_TOP_LOGPROBS, REPETITION_PENALTY_RANGE, SamplingParams

MAX_STOP_SEQUENCES = 16


def whole(pattern: str) -> str:
    """`pattern` (as the server checks it, with fullmatch) as an OpenAPI pattern, which matches anywhere."""
    return f"^(?:{pattern})$"


# What the names in paths, queries and bodies must look like, in the OpenAPI schema (json_schema_extra: the
# server's own checks, prefix_store/base.py and server/tenants/namespaces.py, give the 422 naming the field)
TASK_NAME_SCHEMA = {"pattern": whole(TASK_NAME)}
TASK_REF_SCHEMA = {"pattern": whole(f"{TASK_NAME}(?:@{VERSION})?")}  # NAME or NAME@VERSION
VERSION_SCHEMA = {"pattern": whole(VERSION)}
TENANT_SCHEMA = {"pattern": whole(TENANT_NAME), "not": {"const": "shared"}}  # 'shared': server/tenants/namespaces.py
SSE = {"text/event-stream": {"schema": {  # each event: `data: JSON` (docs/api.md), the OpenAI streams end with [DONE]
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}
# the ranges SamplingParams.validate and the routes check (a value outside is a 422 naming the field)
TOP_P = {"exclusiveMinimum": 0, "maximum": 1}
REPETITION_PENALTY = {"minimum": REPETITION_PENALTY_RANGE[0], "maximum": REPETITION_PENALTY_RANGE[1]}
SEED = {"minimum": 0, "maximum": 2**63 - 1}
NON_EMPTY = {"type": "string", "minLength": 1}
MAX_ALTERNATIVES = 8  # alternatives of one must_include phrase
MAX_MUST_INCLUDE_CHARS = 200
MUST_INCLUDE_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_MUST_INCLUDE_CHARS, "pattern": r"\S"}
STREAMED = {200: {"content": SSE, "description": "JSON, or server-sent events when the body asks to stream"}}


def must_include_field() -> Any:
    """The `must_include` field of the TGI `parameters` and of the OpenAI bodies (one definition, one schema)."""
    return Field(
        None, description="Phrases the output must say before it may end: each a string, or a list of "
        "alternatives of which one counts. Until each has appeared, EOS, stop tokens and tokens holding a stop "
        "string are not chosen; the token limit still ends the output (prefixserve extension)",
        json_schema_extra={"maxItems": MAX_MUST_INCLUDE, "items": {"anyOf": [
            MUST_INCLUDE_TEXT, {"type": "array", "minItems": 1, "maxItems": MAX_ALTERNATIVES,
                                "items": MUST_INCLUDE_TEXT}]}})


class Lenient(BaseModel):
    """Ignores unknown fields; refuses NaN and infinity."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Parameters(Lenient):
    """TGI's `parameters` (plus LoRAX's adapter_id, ignore_eos_token)."""

    max_new_tokens: int | None = Field(None, description="Tokens to generate (default: --max-new-tokens-default)",
                                       json_schema_extra={"minimum": 1})
    do_sample: bool | None = Field(None, description="Sample instead of greedy (implied by temperature/top_k/top_p)")
    temperature: float | None = Field(None, description="Softmax temperature; 0 means greedy",
                                      json_schema_extra={"minimum": 0})
    top_k: int | None = Field(None, description="Keep the k most likely tokens", json_schema_extra={"minimum": 0})
    top_p: float | None = Field(None, description="Nucleus sampling mass", json_schema_extra=TOP_P)
    repetition_penalty: float | None = Field(None, description="HF repetition penalty (1 = off)",
                                             json_schema_extra=REPETITION_PENALTY)
    seed: int | None = Field(None, description="Seed of the row's own generator", json_schema_extra=SEED)
    stop: list[str] | None = Field(None, description="Stop strings (removed from the text)",
                                   json_schema_extra={"maxItems": MAX_STOP_SEQUENCES, "items": NON_EMPTY})
    details: bool | None = Field(None, description="Return finish reason, tokens and logprobs")
    decoder_input_details: bool | None = Field(None, description="Also return the prompt tokens (no logprobs)")
    return_full_text: bool | None = Field(None, description="Prepend the inputs to generated_text")
    truncate: int | None = Field(None, description="Keep only the last N input tokens",
                                 json_schema_extra={"minimum": 1})
    adapter_id: str | None = Field(None, description="The task (LoRAX's name for it); same as ?task=",
                                   json_schema_extra=TASK_REF_SCHEMA)
    ignore_eos_token: bool | None = Field(None, description="Keep generating after the EOS token")
    must_include: list[str | list[str]] | None = must_include_field()
    # Accepted so clients can send them; only their neutral values are allowed.
    best_of: int | None = Field(None, json_schema_extra={"enum": [1, None]})
    typical_p: float | None = Field(None, json_schema_extra={"minimum": 1})
    watermark: bool | None = Field(None, json_schema_extra={"enum": [False, None]})
    top_n_tokens: int | None = Field(None, json_schema_extra={"minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    return_k_alternatives: int | None = Field(None, json_schema_extra={"enum": [0, None]})
    frequency_penalty: float | None = Field(None, json_schema_extra={"enum": [0, None]})
    grammar: Any = Field(None, json_schema_extra={"type": "null"})
    response_format: Any = Field(None, json_schema_extra={"type": "null"})
    merged_adapters: Any = Field(None, json_schema_extra={"type": "null"})


class GenerateRequest(Lenient):
    """TGI's body: `{"inputs": "...", "parameters": {...}}` (and `stream` on the compat route)."""

    inputs: str = Field(..., description="The prompt", json_schema_extra={"minLength": 1})
    parameters: Parameters | None = None
    stream: bool | None = Field(None, description="Compat route only: answer with server-sent events")


def _unsupported(p: Parameters) -> str | None:
    checks = [
        ("best_of", p.best_of in (None, 1)),
        ("typical_p", p.typical_p is None or p.typical_p >= 1.0),
        ("watermark", not p.watermark),
        ("return_k_alternatives", not p.return_k_alternatives),
        ("frequency_penalty", not p.frequency_penalty),
        ("grammar", p.grammar is None),
        ("response_format", p.response_format is None),
        ("merged_adapters", p.merged_adapters is None),
    ]
    return next((name for name, ok in checks if not ok), None)


def check_stops(stops: list[str] | None, field: str) -> list[str]:
    """Validate stop strings: at most MAX_STOP_SEQUENCES, none empty."""
    stops = list(stops or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise validation(f"{field}: at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not s for s in stops):
        raise validation(f"{field}: stop sequences must be non-empty strings")
    return stops


def check_must_include(phrases: list[str | list[str]] | None, field: str) -> list[list[str]]:
    """Validate must_include: at most MAX_MUST_INCLUDE phrases, each a non-empty string (at most
    MAX_MUST_INCLUDE_CHARS characters) or a list of 1 to MAX_ALTERNATIVES of them; returned as lists."""
    phrases = list(phrases or [])
    if len(phrases) > MAX_MUST_INCLUDE:
        raise validation(f"{field}: at most {MAX_MUST_INCLUDE} phrases")
    out = []
    for i, p in enumerate(phrases):
        alts = [p] if isinstance(p, str) else list(p)
        if not 1 <= len(alts) <= MAX_ALTERNATIVES:
            raise validation(f"{field}[{i}]: a string or a list of 1 to {MAX_ALTERNATIVES} alternatives")
        if any(not isinstance(a, str) or not a.strip() or len(a) > MAX_MUST_INCLUDE_CHARS for a in alts):
            raise validation(f"{field}[{i}]: phrases must be non-blank strings of at most "
                             f"{MAX_MUST_INCLUDE_CHARS} characters")
        out.append(alts)
    return out


def sampling_params(max_new_tokens: int | None, default_max: int, *, do_sample: bool | None = None,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float | None = None, seed: int | None = None,
                    ignore_eos: bool | None = None, top_logprobs: int | None = None,
                    prefix: str = "parameters.") -> SamplingParams:
    """Build validated SamplingParams. As in TGI, temperature/top_k/top_p imply sampling; temperature 0 is greedy."""
    greedy_temp = temperature == 0
    sample = bool(do_sample) or (temperature not in (None, 1.0) and not greedy_temp) or bool(top_k) \
        or (top_p is not None and top_p < 1.0)
    sp = SamplingParams(
        max_new_tokens=default_max if max_new_tokens is None else max_new_tokens,
        do_sample=sample and not greedy_temp,
        temperature=1.0 if temperature in (None, 0) else temperature,
        top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        seed=seed, ignore_eos=bool(ignore_eos), top_logprobs=top_logprobs or 0)
    if sp.do_sample and sp.seed is None:
        sp.seed = secrets.randbits(63)  # drawn here so the response can report it (TGI's details.seed)
    return checked(sp, prefix)


def checked(sp: SamplingParams, prefix: str = "parameters.") -> SamplingParams:
    """`sp`, validated: a refused value is a 422 naming its field."""
    try:
        sp.validate()
    except ValueError as e:
        raise validation(f"{prefix}{e}") from None
    return sp


def tgi_params(p: Parameters, default_max: int) -> tuple[SamplingParams, list[str]]:
    """TGI parameters -> (SamplingParams, stop strings); 422 naming the field when a value is refused."""
    bad = _unsupported(p)
    if bad:
        raise validation(f"parameters.{bad}: not supported by this server (leave it null)")
    if p.truncate is not None and p.truncate < 1:
        raise validation("parameters.truncate: must be >= 1")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= MAX_TOP_LOGPROBS:
        raise validation(f"parameters.top_n_tokens: must be in [0, {MAX_TOP_LOGPROBS}]")
    sp = sampling_params(p.max_new_tokens, default_max, do_sample=p.do_sample, temperature=p.temperature,
                         top_k=p.top_k, top_p=p.top_p, repetition_penalty=p.repetition_penalty, seed=p.seed,
                         ignore_eos=p.ignore_eos_token, top_logprobs=p.top_n_tokens)
    return sp, check_stops(p.stop, "parameters.stop")


# ---------------------------------------------------------------- responses (TGI's shapes)
class Token(BaseModel):
    """One generated token."""

    id: int
    text: str
    logprob: float
    special: bool


class InputToken(BaseModel):
    """One prompt token (no logprob: the engine does not score prompts)."""

    id: int
    text: str
    logprob: float | None = None


class Details(BaseModel):
    """`details` of /generate."""

    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] | None = Field(None, description="With parameters.top_n_tokens: per token, the "
                                                 "most likely tokens at that step")


class GenerateResponse(BaseModel):
    """Body of /generate."""

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    """`details` of the last stream event."""

    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    """One server-sent event of /generate_stream."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None
