"""TGI/LoRAX routes: POST /generate, POST /generate_stream (server-sent events) and the compat route POST /."""
from __future__ import annotations

import json
import logging
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.auth import AuthenticatedRoute, CallerDep
from server.api.deps import AppState, StateDep
from server.api.errors import error_body, error_responses, to_api_error, validation
from server.api.logprobs import tgi_top_tokens
from server.api.schemas import (Details, GenerateRequest, GenerateResponse, InputToken, Parameters, StreamDetails,
                                SSE, STREAMED, StreamResponse, TASK_REF_SCHEMA, Token, check_must_include, checked,
                                tgi_params)
from server.api.service import Generation, Started, StartedDep, run_or_cancel, start
from server.engine.sampling import SamplingParams
from server.tenants.namespaces import Caller

logger = logging.getLogger(__name__)
router = APIRouter(tags=["generate (TGI / LoRAX)"], route_class=AuthenticatedRoute,
                   responses=error_responses())

TaskQuery = Annotated[str | None, Query(description="Task (prefix) name, or NAME@VERSION; none = the bare base model",
                                        json_schema_extra=TASK_REF_SCHEMA)]
VERSION_HEADER = "X-Prefix-Version"


def version_headers(version: str | None) -> dict[str, str]:
    """The header naming the prefix version that served a response (absent for the base model)."""
    return {VERSION_HEADER: version} if version else {}


def pick_task(query_task: str | None, adapter_id: str | None) -> str | None:
    """?task= or LoRAX's parameters.adapter_id; both given must agree, and neither may be empty (an empty one is
    a mistake, not a request for the base model: leave it out for that)."""
    for name, value in (("task", query_task), ("parameters.adapter_id", adapter_id)):
        if value is not None and not value.strip():
            raise validation(f"{name}: must not be empty (leave it out to use the bare base model)")
    if query_task and adapter_id and query_task != adapter_id:
        raise validation(f"parameters.adapter_id: {adapter_id!r} differs from ?task={query_task!r}")
    return query_task or adapter_id or None


async def with_phrases(state: AppState, params: list[SamplingParams], phrases: list[list[str]], stops: list[str],
                       prefix: str) -> None:
    """Give each SamplingParams the must_include phrases (checked by `check_must_include`) as the tokenizer spells
    them, and the ids that hold or continue a stop string (a row may not end on them before its phrases appear); a
    value the engine refuses is a 422 naming `prefix`must_include."""
    if not phrases:
        return
    fields = await state.tokenizing.must_include(phrases, stops)
    for sp in params:
        for name, value in fields.items():
            setattr(sp, name, value)
        checked(sp, prefix)


async def _start(state: AppState, caller: Caller, started: Started, body: GenerateRequest, query_task: str | None,
                 route: str) -> Generation:
    p = body.parameters or Parameters()
    params, stops = tgi_params(p, state.settings.max_new_tokens_default)
    phrases = check_must_include(p.must_include, "parameters.must_include")
    ids = await state.tokenizing.encode(body.inputs, truncate=p.truncate)
    await with_phrases(state, [params], phrases, stops, "parameters.")
    return await start(state, caller, started, pick_task(query_task, p.adapter_id), ids, params, stops, route)


def _details(gen: Generation, p: Parameters) -> Details:
    r = gen.handle.request
    prefill = []
    if p.decoder_input_details:
        tok = gen.state.tokenizer
        prefill = [InputToken(id=i, text=tok.decode([i])) for i in r.prompt_ids]
    top = [tgi_top_tokens(gen.decoder, t.top) for t in gen.emitted] if r.params.top_logprobs else None
    return Details(finish_reason=gen.finish_reason, generated_tokens=len(gen.emitted),
                   prompt_tokens=len(r.prompt_ids), seed=r.params.seed if r.params.do_sample else None,
                   prefill=prefill, tokens=[Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special)
                                            for t in gen.emitted], top_tokens=top)


def _response(gen: Generation, body: GenerateRequest) -> dict[str, Any]:
    p = body.parameters or Parameters()
    text = (body.inputs + gen.text) if p.return_full_text else gen.text
    out: dict[str, Any] = {"generated_text": text}
    if p.details:
        out["details"] = _details(gen, p).model_dump(exclude={"top_tokens"} if not p.top_n_tokens else None)
    return out


async def _generate_json(state: AppState, caller: Caller, started: Started, body: GenerateRequest, request: Request,
                         task: str | None, route: str, as_list: bool) -> JSONResponse:
    gen = await _start(state, caller, started, body, task, route)
    await run_or_cancel(request, [gen])
    out = _response(gen, body)
    return JSONResponse([out] if as_list else out, headers=version_headers(gen.version))


def sse(data: Any) -> bytes:
    """One server-sent event in TGI's framing."""
    return b"data:" + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _tgi_events(gen: Generation, body: GenerateRequest) -> AsyncIterator[bytes]:
    p = body.parameters or Parameters()
    try:
        async for t in gen.tokens():
            ev = StreamResponse(index=t.index + 1, token=Token(id=t.id, text=t.text, logprob=t.logprob,
                                                               special=t.special),
                                top_tokens=tgi_top_tokens(gen.decoder, t.top) if p.top_n_tokens else None)
            if t.last:
                r = gen.handle.request
                ev.generated_text = (body.inputs + gen.text) if p.return_full_text else gen.text
                ev.details = StreamDetails(finish_reason=gen.finish_reason, generated_tokens=len(gen.emitted),
                                           prompt_tokens=len(r.prompt_ids),
                                           seed=r.params.seed if r.params.do_sample else None)
            yield sse(ev.model_dump(exclude={"top_tokens"} if not p.top_n_tokens else None))
    except Exception as e:  # the status line is gone: report in the stream, as TGI does
        err = to_api_error(e)
        yield sse(error_body(err.message, err.error_type))


def stream_response(events: AsyncIterator[bytes], version: str | None) -> StreamingResponse:
    """A text/event-stream response that is neither buffered nor cached."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **version_headers(version)}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True)
async def generate(body: GenerateRequest, request: Request, state: StateDep, caller: CallerDep,
                   started: StartedDep, task: TaskQuery = None) -> JSONResponse:
    """Generate text for `inputs` with the task's prefix (TGI's /generate)."""
    return await _generate_json(state, caller, started, body, request, task, "generate", as_list=False)


@router.post("/generate_stream", response_class=StreamingResponse,
             responses={200: {"content": SSE, "description": "Server-sent events, one per token"}})
async def generate_stream(body: GenerateRequest, state: StateDep, caller: CallerDep, started: StartedDep,
                          task: TaskQuery = None) -> StreamingResponse:
    """Generate text as server-sent events, one per token; the last carries generated_text and details."""
    gen = await _start(state, caller, started, body, task, "generate_stream")
    return stream_response(_tgi_events(gen, body), gen.version)


@router.post("/", responses=STREAMED)
async def compat(body: GenerateRequest, request: Request, state: StateDep, caller: CallerDep,
                 started: StartedDep, task: TaskQuery = None):
    """TGI's compatibility route used by the text-generation and lorax-client packages (JSON list or SSE)."""
    if body.stream:
        gen = await _start(state, caller, started, body, task, "compat_stream")
        return stream_response(_tgi_events(gen, body), gen.version)
    return await _generate_json(state, caller, started, body, request, task, "compat", as_list=True)
