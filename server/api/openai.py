"""OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (model = task)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

from server.api.auth import AuthenticatedRoute, CallerDep
from server.api.deps import AppState, StateDep
from server.api.errors import APIError, error_responses, openai_error_body, to_api_error, validation
from server.api.generate import stream_response, with_phrases
from server.api.logprobs import MAX_COMPLETION_LOGPROBS, chat_logprobs, chat_top, completion_logprobs, completion_top
from server.api.schemas import (MAX_STOP_SEQUENCES, NON_EMPTY, REPETITION_PENALTY, SEED, STREAMED, TOP_P, Lenient,
                                check_must_include, check_stops, must_include_field, sampling_params)
from prefix_store.base import InvalidTaskName, split_task_ref
from server.api.service import Generation, StartedDep, TokenOut, run_or_cancel, start_many, visible_tasks
from server.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams
from server.tenants.namespaces import split_stored

router = APIRouter(prefix="/v1", tags=["openai"], route_class=AuthenticatedRoute,
                   responses=error_responses(openai=True))
FINGERPRINT = "prefixserve-0.1.0"
_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
MAX_CHOICES = 64


class StreamOptions(Lenient):
    """OpenAI's stream_options."""

    include_usage: bool | None = None


class _Common(Lenient):
    """Fields shared by completions and chat completions."""

    model: str = Field(description="Task name, or the base model's id (GET /v1/models lists both) for no task",
                       json_schema_extra={"minLength": 1})
    max_tokens: int | None = Field(None, description="Tokens to generate (default: --max-new-tokens-default, 20)",
                                   json_schema_extra={"minimum": 1})
    temperature: float | None = Field(None, description="Default 1 (sampling); 0 means greedy",
                                      json_schema_extra={"minimum": 0})
    top_p: float | None = Field(None, json_schema_extra=TOP_P)
    n: int | None = Field(None, description="Choices per prompt", json_schema_extra={"minimum": 1,
                                                                                     "maximum": MAX_CHOICES})
    stop: str | list[str] | None = Field(None, json_schema_extra={"anyOf": [
        NON_EMPTY, {"type": "array", "items": NON_EMPTY, "maxItems": MAX_STOP_SEQUENCES}, {"type": "null"}]})
    seed: int | None = Field(None, json_schema_extra=SEED)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="Keep generating after the EOS token (vLLM's extension)")
    top_k: int | None = Field(None, description="Keep the k most likely tokens (vLLM's extension; 0 or -1: off)",
                              json_schema_extra={"minimum": -1})
    repetition_penalty: float | None = Field(None, description="HF repetition penalty, 1 = off (vLLM's extension)",
                                             json_schema_extra=REPETITION_PENALTY)
    must_include: list[str | list[str]] | None = must_include_field()
    # accepted with neutral values only
    presence_penalty: float | None = Field(None, json_schema_extra={"enum": [0, None]})
    frequency_penalty: float | None = Field(None, json_schema_extra={"enum": [0, None]})
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})
    logprobs: Any = Field(None, description="completions: alternatives per token (0-5); chat: true/false")
    top_logprobs: int | None = Field(None, description="chat: alternatives per token (0-20), with logprobs: true",
                                     json_schema_extra={"minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    best_of: int | None = Field(None, json_schema_extra={"enum": [1, None]})
    tools: Any = Field(None, json_schema_extra={"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0},
                                                          {"type": "object", "maxProperties": 0}]})
    response_format: Any = Field(None, json_schema_extra={"anyOf": [{"type": "null"}, {
        "type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
        "additionalProperties": False}]})


def _whole_float(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


TokenId = Annotated[StrictInt, BeforeValidator(_whole_float)]  # 7 or 7.0 (JSON Schema's integers); not "7" or true
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}  # below the vocabulary size
PROMPT_SCHEMA = [{"type": "string", "minLength": 1},
                 {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                 _IDS, {"type": "array", "items": _IDS, "minItems": 1}]


class CompletionRequest(_Common):
    """POST /v1/completions."""

    # strict: an array of mixed or other types (["a", 1], [1.5], [true], ["1"] as ids) is a 422, as the schema says
    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]] = Field(
        ..., description="Prompt(s): text or token ids", json_schema_extra={"anyOf": PROMPT_SCHEMA})
    echo: bool | None = Field(None, description="Prepend the prompt to the text")
    suffix: str | None = Field(None, json_schema_extra={"enum": ["", None]})
    logprobs: Any = Field(None, description="Alternatives per token (0-5)", json_schema_extra={"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS}, {"enum": [False, None]}]})


class ChatMessage(Lenient):
    """One chat message; content as a string or a list of text parts."""

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra={  # top_logprobs > 0 needs logprobs: true
        "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}})

    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: int | None = Field(None, description="Tokens to generate (0 or null: max_tokens)",
                                              json_schema_extra={"minimum": 0})
    logprobs: Any = Field(None, description="Return log-probabilities", json_schema_extra={"enum": [True, False, None]})


def _check_neutral(r: _Common) -> None:
    checks = [("presence_penalty", not r.presence_penalty), ("frequency_penalty", not r.frequency_penalty),
              ("logit_bias", not r.logit_bias), ("best_of", r.best_of in (None, 1)), ("tools", not r.tools),
              ("response_format", r.response_format in (None, {"type": "text"}))]
    bad = next((name for name, ok in checks if not ok), None)
    if bad:
        raise validation(f"{bad}: not supported by this server")
    if r.n is not None and not 1 <= r.n <= MAX_CHOICES:
        raise validation(f"n: must be in [1, {MAX_CHOICES}]")


def _task(state: AppState, model: str) -> str | None:
    """The task `model` names; None for the base model."""
    if not model:
        raise validation(f"model: must not be empty: give a task name, or {state.model_id!r} (the base model) for "
                         "no task; GET /v1/models lists both")
    if model in (state.model_id, state.loaded.name):
        return None
    try:
        split_task_ref(model)
    except InvalidTaskName:  # as OpenAI answers a model it does not have (a 422 elsewhere: not a task name)
        raise APIError(404, f"model: no model or task named {model[:140]!r}; GET /v1/models lists them",
                       "not_found") from None
    return model


def _params(state: AppState, r: _Common, max_tokens: int | None,
            top: int | None) -> tuple[list[SamplingParams], list[str], list[list[str]]]:
    """One SamplingParams per choice (choice i of a seeded sampling request uses seed + i), the stop strings and the
    checked must_include phrases (`with_phrases` adds them once the prompts are tokenised); `top` alternatives per
    token when logprobs were asked for."""
    _check_neutral(r)
    if r.top_k is not None and r.top_k < -1:
        raise validation("top_k: must be -1 or 0 (off) or a positive number of tokens")
    temperature = 1.0 if r.temperature is None else r.temperature
    base = sampling_params(max_tokens, state.settings.max_new_tokens_default, do_sample=temperature > 0,
                           temperature=temperature, top_k=max(r.top_k or 0, 0), top_p=r.top_p,
                           repetition_penalty=r.repetition_penalty, seed=r.seed, ignore_eos=r.ignore_eos,
                           top_logprobs=top, prefix="")
    stops = check_stops([r.stop] if isinstance(r.stop, str) else r.stop, "stop")
    phrases = check_must_include(r.must_include, "must_include")
    out = []
    for i in range(r.n or 1):
        sp = SamplingParams(**{**base.__dict__})
        if sp.do_sample and sp.seed is not None:
            sp.seed = (sp.seed + i) % 2**63
        out.append(sp)
    return out, stops, phrases


async def _prompts(state: AppState, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await state.tokenizing.encode(prompt, field="prompt")]
    if not prompt:
        raise validation("prompt: must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return await state.tokenizing.encode_many(prompt, field="prompt")
    return [list(p) for p in prompt]


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, TokenOut]]:
    """Interleave the tokens of several generations as they arrive; errors end the stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for t in g.tokens():
                queue.put_nowait((i, t, None))
            queue.put_nowait((i, None, None))
        except Exception as e:
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, t, err = await queue.get()
            if err is not None:
                raise err
            if t is None:
                remaining -= 1
            else:
                yield i, t
    finally:
        for task in tasks:
            task.cancel()


def _usage(gens: list[Generation]) -> dict[str, int]:
    prompt = sum(len(g.handle.request.prompt_ids) for g in gens)
    done = sum(len(g.emitted) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _headers(gens: list[Generation]) -> dict[str, str]:
    return {"X-Prefix-Version": gens[0].version} if gens and gens[0].version else {}


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _openai_stream(gens: list[Generation], head: dict[str, Any], choice, usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks: choice(index, token) builds each choice; a final usage chunk when asked; then [DONE]."""
    try:
        async for i, t in merged(gens):
            c = choice(i, t)
            if c is not None:
                yield _data({**head, "choices": [c]})
        if usage:
            yield _data({**head, "choices": [], "usage": _usage(gens)})
    except Exception as e:
        err = to_api_error(e)
        yield _data(openai_error_body(err.status, err.message, err.error_type))
    yield b"data: [DONE]\n\n"


@router.post("/completions", responses=STREAMED)
async def completions(body: CompletionRequest, request: Request, state: StateDep, caller: CallerDep,
                      started: StartedDep):
    """OpenAI completions: `model` is the task; `prompt` a string or a list; n, stop, seed, stream."""
    if body.suffix:
        raise validation("suffix: not supported by this server")
    task = _task(state, body.model)
    top = completion_top(body.logprobs)
    params, stops, phrases = _params(state, body, body.max_tokens, top)
    prompts = await _prompts(state, body.prompt)
    await with_phrases(state, params, phrases, stops, "")
    jobs = [(task, ids, sp, stops) for ids in prompts for sp in params]
    gens = await start_many(state, caller, started, jobs, "v1_completions")
    echo = [state.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in params]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": FINGERPRINT}
    if body.stream:
        sent: dict[int, int] = {}  # choice -> characters of token text sent so far (logprobs' text_offset)

        def choice(i: int, t: TokenOut) -> dict[str, Any] | None:
            text = t.visible if i in sent else echo[i] + t.visible
            offset = sent.setdefault(i, len(echo[i]))
            sent[i] += len(t.text)
            lp = completion_logprobs(gens[i].decoder, [t], offset) if top is not None else None
            reason = _FINISH.get(gens[i].finish_reason) if t.last else None
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}

        usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(_openai_stream(gens, head, choice, usage), gens[0].version)
    await run_or_cancel(request, gens)
    choices = [{"index": i, "text": echo[i] + g.text,
                "logprobs": completion_logprobs(g.decoder, g.emitted, len(echo[i])) if top is not None else None,
                "finish_reason": _FINISH.get(g.finish_reason, g.finish_reason)} for i, g in enumerate(gens)]
    return JSONResponse({**head, "choices": choices, "usage": _usage(gens)}, headers=_headers(gens))


async def _chat_prompt(state: AppState, messages: list[ChatMessage]) -> list[int]:
    if not messages:
        raise validation("messages: must not be empty")
    convo = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        convo.append({"role": m.role, "content": content or ""})
    return await state.tokenizing.encode_chat(convo)


@router.post("/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatRequest, request: Request, state: StateDep, caller: CallerDep,
                           started: StartedDep):
    """OpenAI chat completions for models with a chat template; `model` is the task."""
    task = _task(state, body.model)
    top = chat_top(body.logprobs, body.top_logprobs)
    params, stops, phrases = _params(state, body, body.max_completion_tokens or body.max_tokens, top)
    ids = await _chat_prompt(state, body.messages)
    await with_phrases(state, params, phrases, stops, "")
    jobs = [(task, ids, sp, stops) for sp in params]
    gens = await start_many(state, caller, started, jobs, "v1_chat")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.model, "system_fingerprint": FINGERPRINT}
    if body.stream:
        head["object"] = "chat.completion.chunk"
        started = set()

        def choice(i: int, t: TokenOut) -> dict[str, Any] | None:
            delta: dict[str, Any] = {"content": t.visible}
            if i not in started:
                started.add(i)
                delta["role"] = "assistant"
            reason = _FINISH.get(gens[i].finish_reason) if t.last else None
            lp = chat_logprobs(gens[i].decoder, [t]) if top is not None else None
            if not t.visible and reason is None and "role" not in delta and lp is None:
                return None
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}

        usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(_openai_stream(gens, head, choice, usage), gens[0].version)
    await run_or_cancel(request, gens)
    choices = [{"index": i, "message": {"role": "assistant", "content": g.text},
                "logprobs": chat_logprobs(g.decoder, g.emitted) if top is not None else None,
                "finish_reason": _FINISH.get(g.finish_reason, g.finish_reason)} for i, g in enumerate(gens)]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": _usage(gens)},
                        headers=_headers(gens))


@router.get("/models")
async def models(state: StateDep, caller: CallerDep) -> dict[str, Any]:
    """The base model and every task the caller can use (use a task's id as `model`)."""
    base = state.model_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "prefixserve"}]
    for name, (stored, m) in (await visible_tasks(state, caller)).items():
        owner = split_stored(stored)[0] or "prefixserve"  # a tenant's own task: the tenant
        data.append({"id": name, "object": "model", "created": 0, "owned_by": owner, "root": base, "parent": base,
                     "version": m.sha256})
    return {"object": "list", "data": data}
