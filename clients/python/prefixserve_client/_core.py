"""What the sync and async clients share: request descriptions, the retry policy, uploads and SSE parsing."""
from __future__ import annotations

import io
import json
import logging
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote

import httpx

from prefixserve_client.errors import (BadRequestError, NotFoundError, PrefixServeError, UnavailableError,
                                       error_from_response)
from prefixserve_client.types import (ChatCompletion, Completion, DeleteResult, GenerateResponse, ModelInfo,
                                      PrefixInfo, PrefixVersion, StreamEvent)

logger = logging.getLogger("prefixserve_client")

VERSION_HEADER = "X-Prefix-Version"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
NATIVE_FILES = ("manifest.json", "prefix.safetensors")
# Transport errors after which the request certainly or harmlessly did not run: retried like a 503.
RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
_STREAM_ERRORS = {"not_found": NotFoundError, "validation": BadRequestError, "overloaded": UnavailableError,
                  "unavailable": UnavailableError, "store": UnavailableError}


@dataclass
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter on 429/503 and failed connections.

    A server's Retry-After is honoured (waited in full); one longer than `max_wait` is not waited for: the error
    is raised at once with its `retry_after`, so the caller decides.
    """

    max_attempts: int = 4  # tries in all, the first included; 1 disables retries
    backoff: float = 0.5  # first wait when the server gives no Retry-After; doubles each attempt
    max_backoff: float = 8.0  # cap of the computed backoff
    max_wait: float = 30.0  # longest Retry-After the client waits for
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))

    def delay(self, attempt: int, error: PrefixServeError | None) -> float | None:
        """Seconds to wait before try `attempt + 1`, or None when the failure of try `attempt` is final."""
        if attempt >= self.max_attempts:
            return None
        if error is not None and error.status is not None:
            if error.status not in self.statuses:
                return None
            if error.retry_after is not None:
                return error.retry_after if error.retry_after <= self.max_wait else None
        computed = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return computed * random.uniform(0.5, 1.0)


@dataclass
class Call:
    """One HTTP request and how to read its answer. Uploads are held as bytes so a retry can resend them."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: dict[str, Any] | None = None
    json: Any = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    stream: bool = False
    headers: dict[str, str] | None = None

    def request_kwargs(self) -> dict[str, Any]:
        """Arguments for httpx's build_request (a fresh multipart body each time)."""
        kw: dict[str, Any] = {"params": self.params, "json": self.json, "headers": self.headers}
        if self.files is not None:
            kw["files"] = [(k, (n, io.BytesIO(b), t)) for k, (n, b, t) in self.files]
        return kw


def http_options(base_url: str, api_key: str | None, timeout: float | httpx.Timeout,
                 headers: Mapping[str, str] | None) -> dict[str, Any]:
    """httpx client options: base URL, timeout, and `Authorization: Bearer KEY` when a key is set."""
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": base_url.rstrip("/"), "timeout": timeout, "headers": {**auth, **(headers or {})}}


def retry_or_raise(policy: RetryPolicy, call: Call, attempt: int, failure: PrefixServeError,
                   cause: BaseException) -> float:
    """Seconds to wait before the next try of `call`, or raise `failure` when the policy says it is final."""
    delay = policy.delay(attempt, failure)
    if delay is None:
        raise failure from (None if cause is failure else cause)
    logger.info("%s %s failed (%s); retry %d/%d in %.2f s", call.method, call.path, failure, attempt,
                policy.max_attempts - 1, delay)
    return delay


def check(response: httpx.Response) -> httpx.Response:
    """Raise the typed error of a non-2xx response (its body must be read)."""
    if response.status_code >= 400:
        raise error_from_response(response)
    return response


def _clean(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _name(task: str) -> str:
    return quote(task, safe="@")


def _if_match(expected_version: str | None) -> dict[str, str] | None:
    """`If-Match: "VERSION"`: the server answers 412 when the task moved on (issue 4's optimistic concurrency)."""
    return {"If-Match": f'"{expected_version}"'} if expected_version else None


def _version(r: httpx.Response) -> str | None:
    return r.headers.get(VERSION_HEADER)


# ------------------------------------------------------------------ generation
def generation_body(inputs: str, task: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """TGI's body; None parameters are left out (the server's defaults apply)."""
    return {"inputs": inputs, "parameters": _clean(params)}


def generate_call(inputs: str, task: str | None, params: Mapping[str, Any]) -> Call:
    """POST /generate?task=."""

    def parse(r: httpx.Response) -> GenerateResponse:
        return GenerateResponse.model_validate({**r.json(), "version": _version(r)})

    return Call("POST", "/generate", parse, params=_clean({"task": task}),
                json=generation_body(inputs, task, params))


def stream_call(inputs: str, task: str | None, params: Mapping[str, Any]) -> Call:
    """POST /generate_stream?task= (server-sent events)."""
    return Call("POST", "/generate_stream", lambda r: r, params=_clean({"task": task}),
                json=generation_body(inputs, task, params), stream=True)


DONE = "[DONE]"


def sse_line(line: str) -> str | None:
    """The `data:` payload of one server-sent event line (DONE for OpenAI's end marker), None for other lines."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip() or None


def sse_data(lines: Iterable[str]) -> Iterable[str]:
    """The `data:` payloads of a server-sent event stream, up to OpenAI's `[DONE]`."""
    for line in lines:
        data = sse_line(line)
        if data == DONE:
            return
        if data is not None:
            yield data


def decode_event(data: str) -> dict[str, Any]:
    """One event's JSON; an error event (the stream failed after it started) raises its typed error."""
    obj = json.loads(data)
    if isinstance(obj, dict) and "error" in obj and "token" not in obj and "choices" not in obj:
        err = obj["error"]  # TGI's {"error", "error_type"}, or OpenAI's {"error": {"message", "code", ...}}
        message, kind = (err.get("message"), err.get("code")) if isinstance(err, dict) else (err, obj.get("error_type"))
        cls = _STREAM_ERRORS.get(str(kind), PrefixServeError)
        raise cls(str(message), None, kind, None, obj)
    return obj


def stream_event(data: str) -> StreamEvent:
    """A TGI stream event."""
    return StreamEvent.model_validate(decode_event(data))


def final_response(ev: StreamEvent, tokens: list[Any], version: str | None) -> GenerateResponse | None:
    """The GenerateResponse carried by the last stream event, with every streamed token (None for the others)."""
    if ev.generated_text is None:
        return None
    details = None
    if ev.details is not None:
        details = {**ev.details.model_dump(), "tokens": [t.model_dump() for t in tokens]}
    return GenerateResponse(generated_text=ev.generated_text, details=details, version=version)


# ------------------------------------------------------------------ OpenAI style
def completion_call(prompt: str | list[str], model: str, params: Mapping[str, Any], stream: bool) -> Call:
    """POST /v1/completions (model = task)."""

    def parse(r: httpx.Response) -> Completion:
        return Completion.model_validate({**r.json(), "version": _version(r)})

    body = _clean({"model": model, "prompt": prompt, **params, "stream": stream or None})
    return Call("POST", "/v1/completions", (lambda r: r) if stream else parse, json=body, stream=stream)


def completion_chunk(data: str) -> Completion:
    """One streamed /v1/completions chunk."""
    return Completion.model_validate(decode_event(data))


def chat_call(messages: list[Mapping[str, Any]], model: str, params: Mapping[str, Any]) -> Call:
    """POST /v1/chat/completions (model = task)."""

    def parse(r: httpx.Response) -> ChatCompletion:
        return ChatCompletion.model_validate({**r.json(), "version": _version(r)})

    return Call("POST", "/v1/chat/completions", parse,
                json=_clean({"model": model, "messages": list(messages), **params}))


def models_call() -> Call:
    """GET /v1/models."""
    return Call("GET", "/v1/models", lambda r: [ModelInfo.model_validate(m) for m in r.json()["data"]])


# ------------------------------------------------------------------ prefixes
def _pick(files: Mapping[str, bytes], where: str) -> dict[str, bytes]:
    for wanted in (NATIVE_FILES, PEFT_FILES):
        if all(n in files for n in wanted):
            return {n: files[n] for n in wanted}
    raise ValueError(f"{where}: expected {' + '.join(NATIVE_FILES)} (native) or {' + '.join(PEFT_FILES)} "
                     f"(PEFT adapter), found {sorted(files) or 'nothing'}")


def collect_artifact(source: str | Path | Mapping[str, bytes]) -> dict[str, bytes]:
    """{file name: bytes} to upload from a PEFT or native directory, a zip from download(), or a mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        return _pick({p.name: p.read_bytes() for p in path.iterdir()
                      if p.name in PEFT_FILES + NATIVE_FILES and p.is_file()}, str(path))
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            files = {Path(i.filename).name: z.read(i) for i in z.infolist()
                     if Path(i.filename).name in PEFT_FILES + NATIVE_FILES}
        return _pick(files, str(path))
    raise ValueError(f"{path}: not a directory or a zip holding a prefix artifact")


def upload_call(name: str, source: str | Path | Mapping[str, bytes], description: str | None,
                expected_version: str | None = None) -> Call:
    """PUT /prefixes/NAME with multipart parts named `files`."""
    files = collect_artifact(source)
    parts = [("files", (n, data, "application/octet-stream")) for n, data in files.items()]
    return Call("PUT", f"/prefixes/{_name(name)}", lambda r: PrefixInfo.model_validate(r.json()),
                params=_clean({"description": description}), files=parts, headers=_if_match(expected_version))


def list_call() -> Call:
    """GET /prefixes."""
    return Call("GET", "/prefixes", lambda r: [PrefixInfo.model_validate(p) for p in r.json()["prefixes"]])


def get_call(name: str) -> Call:
    """GET /prefixes/NAME."""
    return Call("GET", f"/prefixes/{_name(name)}", lambda r: PrefixInfo.model_validate(r.json()))


def download_call(name: str, file: str | None) -> Call:
    """GET /prefixes/NAME/download (a zip, or one file with `file`)."""
    return Call("GET", f"/prefixes/{_name(name)}/download", lambda r: r.content, params=_clean({"file": file}))


def delete_call(name: str, expected_version: str | None = None) -> Call:
    """DELETE /prefixes/NAME."""
    return Call("DELETE", f"/prefixes/{_name(name)}", lambda r: DeleteResult.model_validate(r.json()),
                headers=_if_match(expected_version))


def _versions(r: httpx.Response) -> list[PrefixVersion]:
    body = r.json()
    items = body.get("versions", []) if isinstance(body, dict) else body
    return [PrefixVersion.model_validate(v if isinstance(v, dict) else {"version": v}) for v in items]


def versions_call(name: str) -> Call:
    """GET /prefixes/NAME/versions (issue 4)."""
    return Call("GET", f"/prefixes/{_name(name)}/versions", _versions)


def rollback_call(name: str, version: str, expected_version: str | None = None) -> Call:
    """POST /prefixes/NAME/rollback {"version"} (issue 4): the alias moves back to `version`."""
    return Call("POST", f"/prefixes/{_name(name)}/rollback", lambda r: PrefixInfo.model_validate(r.json()),
                json={"version": version}, headers=_if_match(expected_version))


def extract_zip(data: bytes, out_dir: str | Path) -> list[Path]:
    """Write the files of a downloaded artifact zip into out_dir (names only, no directories)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            name = Path(info.filename).name
            if name in NATIVE_FILES:
                (out / name).write_bytes(z.read(info))
                written.append(out / name)
    return written


# ------------------------------------------------------------------ health
def health_call(path: str) -> Call:
    """GET /health or /ready (raises on 503)."""
    return Call("GET", path, lambda r: r.json())


def metrics_call() -> Call:
    """GET /metrics (Prometheus text)."""
    return Call("GET", "/metrics", lambda r: r.text)
