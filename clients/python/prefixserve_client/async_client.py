"""The asyncio client: the same methods as `Client`, awaited; streams are async iterators."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Generic, Mapping, TypeVar

import httpx

from prefixserve_client import _core as core
from prefixserve_client.client import DEFAULT_URL
from prefixserve_client.errors import ConnectionFailed, PrefixServeError, error_from_response
from prefixserve_client.types import (ChatCompletion, Completion, DeleteResult, GenerateResponse, ModelInfo,
                                      PrefixInfo, PrefixVersion, StreamEvent)

E = TypeVar("E")


class AsyncStream(Generic[E]):
    """An async iterator of server-sent events; `response` holds the final GenerateResponse once done."""

    def __init__(self, client: AsyncClient, call: core.Call, parse: Callable[[str], E]):
        self._client, self._call, self._parse = client, call, parse
        self._response: httpx.Response | None = None
        self.response: GenerateResponse | None = None
        self.version: str | None = None

    async def __aiter__(self) -> AsyncIterator[E]:
        self._response = await self._client._send(self._call)
        self.version = self._response.headers.get(core.VERSION_HEADER)
        tokens: list[Any] = []
        try:
            async for line in self._response.aiter_lines():
                data = core.sse_line(line)
                if data == core.DONE:
                    return
                if data is None:
                    continue
                ev = self._parse(data)
                if isinstance(ev, StreamEvent):
                    tokens.append(ev.token)
                    self.response = core.final_response(ev, tokens, self.version) or self.response
                yield ev
        except httpx.TransportError as e:
            raise ConnectionFailed(f"stream interrupted: {e}") from e
        finally:
            await self.aclose()

    async def text(self) -> AsyncIterator[str]:
        """The text of each token (TGI streams) or of each chunk (completions)."""
        async for ev in self:
            if isinstance(ev, StreamEvent):
                yield ev.token.text
            elif isinstance(ev, Completion):
                yield "".join(c.text for c in ev.choices)

    async def aclose(self) -> None:
        """Close the connection (the server frees the row)."""
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncStream[E]:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncClient:
    """Non-blocking client over httpx.AsyncClient, with the same retries, timeouts and errors as `Client`."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = 120.0, retry: core.RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.retry = retry or core.RetryPolicy()
        self._http = httpx.AsyncClient(transport=transport, **core.http_options(base_url, api_key, timeout, headers))

    async def _send(self, call: core.Call) -> httpx.Response:
        """Send with retries; a 2xx response (still open when call.stream) or the typed error."""
        attempt = 0
        while True:
            attempt += 1
            try:
                request = self._http.build_request(call.method, call.path, **call.request_kwargs())
                response = await self._http.send(request, stream=call.stream)
            except core.RETRYABLE_TRANSPORT as e:
                failure: PrefixServeError = ConnectionFailed(f"{call.method} {call.path}: {e!r}")
                cause: Exception = e
            except httpx.TransportError as e:
                raise ConnectionFailed(f"{call.method} {call.path}: {e!r}") from e
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
                failure = cause = error_from_response(response)
            delay = core.retry_or_raise(self.retry, call, attempt, failure, cause)
            await asyncio.sleep(delay)

    async def _call(self, call: core.Call) -> Any:
        response = await self._send(call)
        return call.parse(response)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def generate(self, inputs: str, task: str | None = None, *, max_new_tokens: int | None = None,
                       do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                       details: bool = False, **parameters: Any) -> GenerateResponse:
        """Generate with the task's prefix (None: the bare base model); `parameters` adds any TGI parameter."""
        params = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop=stop, details=details or None, **parameters)
        return await self._call(core.generate_call(inputs, task, params))

    def stream(self, inputs: str, task: str | None = None, *, max_new_tokens: int | None = None,
               do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
               **parameters: Any) -> AsyncStream[StreamEvent]:
        """Stream tokens (`async for ev in client.stream(...)`); `stream.response` is the final response."""
        params = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop=stop, **parameters)
        return AsyncStream(self, core.stream_call(inputs, task, params), core.stream_event)

    async def completion(self, prompt: str | list[str], model: str, **params: Any) -> Completion:
        """OpenAI-style /v1/completions; `model` is the task or the base model's id (models()[0].id)."""
        return await self._call(core.completion_call(prompt, model, params, stream=False))

    def stream_completion(self, prompt: str | list[str], model: str,
                          **params: Any) -> AsyncStream[Completion]:
        """OpenAI-style streamed completion: an async iterator of Completion chunks."""
        return AsyncStream(self, core.completion_call(prompt, model, params, stream=True), core.completion_chunk)

    async def chat(self, messages: list[Mapping[str, Any]], model: str,
                   **params: Any) -> ChatCompletion:
        """OpenAI-style /v1/chat/completions."""
        return await self._call(core.chat_call(messages, model, params))

    async def models(self) -> list[ModelInfo]:
        """/v1/models."""
        return await self._call(core.models_call())

    async def upload(self, name: str, source: str | Path | Mapping[str, bytes],
                     description: str | None = None, *, expected_version: str | None = None) -> PrefixInfo:
        """Upload (or replace) a prefix from a PEFT or native directory, a downloaded zip, or {name: bytes}."""
        # reading the files happens off the event loop
        call = await asyncio.to_thread(core.upload_call, name, source, description, expected_version)
        return await self._call(call)

    async def list(self) -> list[PrefixInfo]:
        """Every stored prefix."""
        return await self._call(core.list_call())

    async def get(self, name: str) -> PrefixInfo:
        """One prefix's manifest and version."""
        return await self._call(core.get_call(name))

    async def download(self, name: str, file: str | None = None) -> bytes:
        """The native artifact as a zip, or one of its files."""
        return await self._call(core.download_call(name, file))

    async def download_to(self, name: str, out_dir: str | Path) -> list[Path]:
        """Download the native artifact into out_dir."""
        return await asyncio.to_thread(core.extract_zip, await self.download(name), out_dir)

    async def delete(self, name: str, *, expected_version: str | None = None) -> DeleteResult:
        """Delete a prefix (with expected_version: only if it is still that version, else ConflictError)."""
        return await self._call(core.delete_call(name, expected_version))

    async def versions(self, name: str) -> list[PrefixVersion]:
        """Every stored version of a task (issue 4)."""
        return await self._call(core.versions_call(name))

    async def rollback(self, name: str, version: str, *, expected_version: str | None = None) -> PrefixInfo:
        """Point the task back at an earlier version (issue 4)."""
        return await self._call(core.rollback_call(name, version, expected_version))

    async def health(self) -> dict[str, Any]:
        """/health."""
        return await self._call(core.health_call("/health"))

    async def ready(self) -> dict[str, Any]:
        """/ready (raises UnavailableError when not ready, after retries)."""
        return await self._call(core.health_call("/ready"))

    async def metrics(self) -> str:
        """/metrics in Prometheus text format."""
        return await self._call(core.metrics_call())
