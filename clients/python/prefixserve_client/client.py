"""The synchronous client: `Client(url).generate("...", task="e2e")`, streaming, completions, prefix management."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

import httpx

from prefixserve_client import _core as core
from prefixserve_client.errors import ConnectionFailed, PrefixServeError, error_from_response
from prefixserve_client.types import (ChatCompletion, Completion, DeleteResult, GenerateResponse, ModelInfo,
                                      PrefixInfo, PrefixVersion, StreamEvent)

E = TypeVar("E")
DEFAULT_URL = "http://127.0.0.1:8000"


class Stream(Generic[E]):
    """An iterator of server-sent events; the request starts on iteration. After the last event of a
    /generate_stream, `response` holds the final GenerateResponse and `version` the prefix version."""

    def __init__(self, client: Client, call: core.Call, parse: Callable[[str], E]):
        self._client, self._call, self._parse = client, call, parse
        self._response: httpx.Response | None = None
        self.response: GenerateResponse | None = None
        self.version: str | None = None

    def __iter__(self) -> Iterator[E]:
        self._response = self._client._send(self._call)  # retried until the stream starts
        self.version = self._response.headers.get(core.VERSION_HEADER)
        tokens: list[Any] = []
        try:
            for data in core.sse_data(self._response.iter_lines()):
                ev = self._parse(data)
                if isinstance(ev, StreamEvent):
                    tokens.append(ev.token)
                    self.response = core.final_response(ev, tokens, self.version) or self.response
                yield ev
        except httpx.TransportError as e:
            raise ConnectionFailed(f"stream interrupted: {e}") from e
        finally:
            self.close()

    def text(self) -> Iterator[str]:
        """The text of each token as it arrives (TGI streams) or each chunk's text (completions)."""
        for ev in self:
            if isinstance(ev, StreamEvent):
                yield ev.token.text
            elif isinstance(ev, Completion):
                yield "".join(c.text for c in ev.choices)

    def close(self) -> None:
        """Close the connection (the server frees the row)."""
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> Stream[E]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Client:
    """Blocking client over httpx. Retries 429/503 and refused connections (bounded, honouring Retry-After)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = 120.0, retry: core.RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None, transport: httpx.BaseTransport | None = None):
        self.retry = retry or core.RetryPolicy()
        self._http = httpx.Client(transport=transport, **core.http_options(base_url, api_key, timeout, headers))

    # ---------------------------------------------------------------- plumbing
    def _send(self, call: core.Call) -> httpx.Response:
        """Send with retries; a 2xx response (still open when call.stream) or the typed error."""
        attempt = 0
        while True:
            attempt += 1
            try:
                request = self._http.build_request(call.method, call.path, **call.request_kwargs())
                response = self._http.send(request, stream=call.stream)
            except core.RETRYABLE_TRANSPORT as e:
                failure: PrefixServeError = ConnectionFailed(f"{call.method} {call.path}: {e!r}")
                cause: Exception = e
            except httpx.TransportError as e:  # timeouts: the request may be running, not retried
                raise ConnectionFailed(f"{call.method} {call.path}: {e!r}") from e
            else:
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
                failure = cause = error_from_response(response)
            delay = core.retry_or_raise(self.retry, call, attempt, failure, cause)
            time.sleep(delay)

    def _call(self, call: core.Call) -> Any:
        response = self._send(call)
        return call.parse(response)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- generation
    def generate(self, inputs: str, task: str | None = None, *, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                 details: bool = False, **parameters: Any) -> GenerateResponse:
        """Generate with the task's prefix (None: the bare base model); `parameters` adds any TGI parameter."""
        params = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop=stop, details=details or None, **parameters)
        return self._call(core.generate_call(inputs, task, params))

    def stream(self, inputs: str, task: str | None = None, *, max_new_tokens: int | None = None,
               do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
               **parameters: Any) -> Stream[StreamEvent]:
        """Stream tokens as StreamEvents; `stream.response` is the final GenerateResponse once done."""
        params = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop=stop, **parameters)
        return Stream(self, core.stream_call(inputs, task, params), core.stream_event)

    def completion(self, prompt: str | list[str], model: str, **params: Any) -> Completion:
        """OpenAI-style /v1/completions; `model` is the task or the base model's id (models()[0].id); params:
        max_tokens, temperature, n, stop, seed..."""
        return self._call(core.completion_call(prompt, model, params, stream=False))

    def stream_completion(self, prompt: str | list[str], model: str,
                          **params: Any) -> Stream[Completion]:
        """OpenAI-style streamed completion: an iterator of Completion chunks."""
        return Stream(self, core.completion_call(prompt, model, params, stream=True), core.completion_chunk)

    def chat(self, messages: list[Mapping[str, Any]], model: str, **params: Any) -> ChatCompletion:
        """OpenAI-style /v1/chat/completions (models with a chat template)."""
        return self._call(core.chat_call(messages, model, params))

    def models(self) -> list[ModelInfo]:
        """/v1/models: the base model and every task."""
        return self._call(core.models_call())

    # ---------------------------------------------------------------- prefixes
    def upload(self, name: str, source: str | Path | Mapping[str, bytes],
               description: str | None = None, *, expected_version: str | None = None) -> PrefixInfo:
        """Upload (or replace) a prefix from a PEFT or native directory, a downloaded zip, or {name: bytes}."""
        return self._call(core.upload_call(name, source, description, expected_version))

    def list(self) -> list[PrefixInfo]:
        """Every stored prefix."""
        return self._call(core.list_call())

    def get(self, name: str) -> PrefixInfo:
        """One prefix's manifest and version."""
        return self._call(core.get_call(name))

    def download(self, name: str, file: str | None = None) -> bytes:
        """The native artifact as a zip, or one of its files (manifest.json / prefix.safetensors)."""
        return self._call(core.download_call(name, file))

    def download_to(self, name: str, out_dir: str | Path) -> list[Path]:
        """Download the native artifact and write manifest.json + prefix.safetensors into out_dir."""
        return core.extract_zip(self.download(name), out_dir)

    def delete(self, name: str, *, expected_version: str | None = None) -> DeleteResult:
        """Delete a prefix (with expected_version: only if it is still that version, else ConflictError)."""
        return self._call(core.delete_call(name, expected_version))

    def versions(self, name: str) -> list[PrefixVersion]:
        """Every stored version of a task (needs a server with versions, issue 4)."""
        return self._call(core.versions_call(name))

    def rollback(self, name: str, version: str, *, expected_version: str | None = None) -> PrefixInfo:
        """Point the task back at an earlier version (needs a server with versions, issue 4)."""
        return self._call(core.rollback_call(name, version, expected_version))

    # ---------------------------------------------------------------- health
    def health(self) -> dict[str, Any]:
        """/health: the process is alive."""
        return self._call(core.health_call("/health"))

    def ready(self) -> dict[str, Any]:
        """/ready: model loaded and engine running (raises UnavailableError otherwise, after retries)."""
        return self._call(core.health_call("/ready"))

    def metrics(self) -> str:
        """/metrics in Prometheus text format."""
        return self._call(core.metrics_call())
