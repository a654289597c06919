"""Upload a trained prefix or LoRA adapter to a running prefixserve server (PUT /prefixes/{name}, multipart
`files`): a native artifact directory (manifest.json + prefix.safetensors) or a PEFT adapter directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefix_store.artifact import MANIFEST_FILE, TENSORS_FILE
from prefix_store.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS

API_KEY_ENV = "PREFIXSERVE_API_KEY"  # the variable prefixctl (clients/python) reads its key from too


class PushError(RuntimeError):
    """The server refused the upload or could not be reached; the message says which and why (the server's own)."""


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _refusal(r: Any) -> PushError:
    """The server's error message of a non-2xx response (TGI's `{"error", "error_type"}` shape)."""
    try:
        body = r.json()
        message, kind = str(body["error"]), str(body.get("error_type", "error"))
    except (ValueError, KeyError, TypeError):
        message, kind = r.text.strip()[:500] or r.reason_phrase, "error"
    return PushError(f"{r.request.method} {r.request.url} answered {r.status_code} {kind}: {message}")


def _request(method: str, url: str, api_key: str | None, timeout: float, **kw: Any) -> Any:
    import httpx

    try:
        r = httpx.request(method, url, headers=_headers(api_key), timeout=timeout, **kw)
    except httpx.HTTPError as e:
        raise PushError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if r.is_error:
        raise _refusal(r)
    return r


def check_push(url: str, api_key: str | None, timeout: float = 30.0) -> None:
    """Before training: the server answers and takes the key (GET /prefixes); PushError otherwise."""
    _request("GET", f"{url.rstrip('/')}/prefixes", api_key, timeout)


def push_prefix(prefix_dir: str | Path, url: str, task: str, api_key: str | None = None,
                timeout: float = 60.0, description: str = "") -> dict:
    """PUT the directory's task files to {url}/prefixes/{task}: manifest.json and prefix.safetensors, or a PEFT
    adapter's adapter_config.json and adapter_model.safetensors (a LoRA adapter, with `description`); the server's
    JSON reply (PushError with the server's message if it refuses)."""
    d = Path(prefix_dir)
    names = (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (d / ADAPTER_CONFIG).exists() else (MANIFEST_FILE, TENSORS_FILE)
    files = [("files", (name, (d / name).read_bytes(), "application/octet-stream")) for name in names]
    data = {"description": description} if description else None
    r = _request("PUT", f"{url.rstrip('/')}/prefixes/{task}", api_key, timeout, files=files, data=data)
    return r.json() if r.content else {"status": r.status_code}
