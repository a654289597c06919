"""Prefix management: PUT/GET/DELETE /prefixes/NAME, GET /prefixes, GET /prefixes/NAME/download.

Uploads are multipart parts named `files` (a PEFT adapter or the native format). The body is counted while it
streams in and refused with 413 as soon as it passes --max-upload-bytes (at once when Content-Length says so).
Nothing is unpickled: only JSON and safetensors are read.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import zipfile
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from prefix_store.artifact import MANIFEST_FILE, TENSORS_FILE, Manifest
from prefix_store.base import PrefixNotFound, validate_task_name
from server.api.deps import AppState, StateDep
from server.api.errors import APIError
from server.api.generate import version_headers
from server.engine.convert import artifact_from_files

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/prefixes", tags=["prefixes"])

MULTIPART_SLACK = 64 * 1024  # room for part headers and boundaries on top of the file bytes
MAX_PARTS = 8
NameParam = Annotated[str, Path(description="Task name: 1-128 of letters, digits, '-', '_', '.'")]


def manifest_body(name: str, m: Manifest) -> dict[str, Any]:
    """The JSON describing one stored prefix."""
    return {"task": name, "version": m.sha256, "manifest": json.loads(m.to_json())}


def _too_large(limit: int) -> APIError:
    return APIError(413, f"upload larger than the limit of {limit} bytes (--max-upload-bytes)", "too_large")


async def _bounded(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, refused with 413 once more than `limit` bytes have arrived."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise _too_large(limit - MULTIPART_SLACK)
        yield chunk


def _file_name(raw: str | None) -> str:
    name = PurePosixPath(PureWindowsPath(raw or "").name).name  # no directories, either way they are written
    if not name or name in (".", ".."):
        raise APIError(422, "files: every part needs a file name (e.g. adapter_config.json)", "validation")
    return name


async def read_upload(request: Request, limit: int) -> tuple[dict[str, bytes], str]:
    """Parse a bounded multipart upload into {file name: bytes} and the optional `description` field."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(415, "send multipart/form-data with one or more parts named 'files'", "validation")
    bound = limit + MULTIPART_SLACK
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > bound:
        raise _too_large(limit)
    parser = MultiPartParser(request.headers, _bounded(request, bound), max_files=MAX_PARTS, max_fields=MAX_PARTS)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise APIError(400, f"malformed multipart body: {e}", "validation") from None
    try:
        files: dict[str, bytes] = {}
        description = ""
        for key, value in form.multi_items():
            if key == "description" and isinstance(value, str):
                description = value
            elif key != "files" or not isinstance(value, UploadFile):
                raise APIError(422, f"unexpected form field {key!r}: send parts named 'files' (file uploads)",
                               "validation")
            else:
                files[_file_name(value.filename)] = await value.read()
    finally:
        await form.close()
    if not files:
        raise APIError(422, "files: no file parts named 'files' in the upload", "validation")
    return files, description


@router.put("/{name}")
async def put_prefix(name: NameParam, request: Request, state: StateDep,
                     description: Annotated[str | None, Query(description="Replaces the description")] = None
                     ) -> JSONResponse:
    """Upload (or atomically replace) a prefix: a PEFT prefix/prompt-tuning adapter or the native format."""
    validate_task_name(name)
    limit = state.settings.max_upload_bytes
    files, form_description = await read_upload(request, limit)
    art = await asyncio.to_thread(artifact_from_files, files, state.loaded, max_bytes=limit,
                                  description=description or form_description)
    _, tensors = await asyncio.to_thread(art.to_bytes)
    try:
        old: Manifest | None = await state.store.get_manifest(name)
    except PrefixNotFound:
        old = None
    stored = await state.store.put(name, art.manifest, tensors)
    if old is not None and old.sha256 != stored.sha256:
        state.cache.drop(old.sha256)  # rows already running keep their pinned copy and finish on it
    logger.info("stored prefix %s version %s (%s, P=%d)", name, stored.sha256[:12], stored.source,
                stored.prefix_length)
    return JSONResponse(manifest_body(name, stored), status_code=201 if old is None else 200,
                        headers=version_headers(stored.sha256))


@router.get("")
async def list_prefixes(state: StateDep) -> dict[str, list[dict[str, Any]]]:
    """Every stored prefix with its manifest."""
    return {"prefixes": [manifest_body(n, m) for n, m in (await state.store.list()).items()]}


@router.get("/{name}")
async def get_prefix(name: NameParam, state: StateDep) -> JSONResponse:
    """One prefix's manifest."""
    m = await state.store.get_manifest(validate_task_name(name))
    return JSONResponse(manifest_body(name, m), headers=version_headers(m.sha256))


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    return buf.getvalue()


@router.get("/{name}/download", response_class=Response)
async def download_prefix(name: NameParam, state: StateDep,
                          file: Annotated[str | None, Query(description=f"{MANIFEST_FILE} or {TENSORS_FILE}; "
                                                            "default: a zip of both")] = None) -> Response:
    """The native artifact (manifest.json + prefix.safetensors), re-uploadable with PUT."""
    m, tensors = await state.store.get(validate_task_name(name))
    files = {MANIFEST_FILE: m.to_json(), TENSORS_FILE: tensors}
    headers = version_headers(m.sha256)
    if file is None:
        headers["Content-Disposition"] = f'attachment; filename="{name}.zip"'
        return Response(await asyncio.to_thread(_zip, files), media_type="application/zip", headers=headers)
    if file not in files:
        raise APIError(422, f"file: must be {MANIFEST_FILE} or {TENSORS_FILE}", "validation")
    headers["Content-Disposition"] = f'attachment; filename="{file}"'
    kind = "application/json" if file == MANIFEST_FILE else "application/octet-stream"
    return Response(files[file], media_type=kind, headers=headers)


@router.delete("/{name}")
async def delete_prefix(name: NameParam, state: StateDep) -> dict[str, str]:
    """Remove a prefix; requests already running on it finish, new ones get 404."""
    m = await state.store.get_manifest(validate_task_name(name))
    await state.store.delete(name)
    state.cache.drop(m.sha256)
    return {"task": name, "deleted": m.sha256}
