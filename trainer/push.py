"""Upload a trained prefix to a running prefixserve server (PUT /prefixes/{name}, multipart `files`)."""
from __future__ import annotations

from pathlib import Path

from prefix_store.artifact import MANIFEST_FILE, TENSORS_FILE


def push_prefix(prefix_dir: str | Path, url: str, task: str, timeout: float = 60.0) -> dict:
    """PUT manifest.json and prefix.safetensors to {url}/prefixes/{task}; return the server's JSON reply."""
    import httpx

    d = Path(prefix_dir)
    files = [("files", (name, (d / name).read_bytes(), "application/octet-stream"))
             for name in (MANIFEST_FILE, TENSORS_FILE)]
    r = httpx.put(f"{url.rstrip('/')}/prefixes/{task}", files=files, timeout=timeout)
    r.raise_for_status()
    return r.json() if r.content else {"status": r.status_code}
