"""Prefix management: PUT/GET/DELETE /prefixes/NAME, GET /prefixes, GET /prefixes/NAME/download, and versions:
GET /prefixes/NAME/versions, POST /prefixes/NAME/rollback (or PUT /prefixes/NAME?version=V).

Every write takes an optional `If-Match: "VERSION"` (or `*`: the task must exist); a task that has moved on
answers 412 with its current version as the ETag. GET and PUT answer with `ETag: "VERSION"`.

Uploads are multipart parts named `files` (a PEFT adapter or the native format). The body is counted while it
streams in and refused with 413 as soon as it passes --max-upload-bytes (at once when Content-Length says so).
Nothing is unpickled: only JSON and safetensors are read.

Names are the caller's (server/tenants/namespaces.py): reads find the caller's own task, else the shared one;
writes go to the caller's own namespace; another tenant's private task is 404 on every route and never changed.
Uploads, deletes and rollbacks are written to the audit log.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import zipfile
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from basemodel.convert import artifact_from_files
from prefix_store.artifact import LORA_KIND, MANIFEST_FILE, TENSORS_FILE, Manifest
from prefix_store.base import (ANY_VERSION, NAMESPACE_SEP, InvalidTaskName, PrefixNotFound, StoreError,
                               VersionNotFound, validate_version)
from server.api.admin import client_address
from server.api.auth import AuthenticatedRoute, CallerDep
from server.api.deps import AppState, StateDep
from server.api.errors import COMMON_ERRORS, APIError, error_responses
from server.api.generate import version_headers
from server.api.limits import MULTIPART_SLACK
from server.api.schemas import TASK_NAME_SCHEMA, TASK_REF_SCHEMA, VERSION_SCHEMA
from server.api.service import visible_tasks
from server.tenants.audit import audit
from server.tenants.namespaces import Caller, candidates, first_found, split_ref, split_stored

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/prefixes", tags=["prefixes"], route_class=AuthenticatedRoute,
                   responses=error_responses(*COMMON_ERRORS, 412))

MAX_PARTS = 8
NameParam = Annotated[str, Path(description="Task name: 1-128 of letters, digits, '-', '_', '.'",
                                json_schema_extra=TASK_NAME_SCHEMA)]
RefParam = Annotated[str, Path(alias="name", description="Task name, or NAME@VERSION for one stored version",
                               json_schema_extra=TASK_REF_SCHEMA)]
IfMatch = Annotated[str | None, Header(alias="If-Match", description='"VERSION" (sha256) or *: write only if '
                                                                     "the task is at that version (else 412)",
                                        json_schema_extra={"anyOf": [{"type": "string",  # when sent, never null
                                            "pattern": r'^(?:\*|(?:W/)?"[0-9a-f]{64}"|[0-9a-f]{64})$'}]})]


class RollbackBody(BaseModel):
    """Body of POST /prefixes/NAME/rollback."""

    version: str = Field(description="A kept version of the task: full sha256 or a unique prefix (>= 7 digits)",
                         json_schema_extra=VERSION_SCHEMA)


def expected_version(if_match: str | None) -> str | None:
    """The If-Match header as `expected_version=`: quotes and W/ stripped, '*' kept; None when absent."""
    if if_match is None:
        return None
    value = if_match.strip().removeprefix("W/").strip().strip('"')
    if value == ANY_VERSION:
        return value
    if len(value) != 64:
        raise APIError(422, f"If-Match: give '*' or the full quoted version (64 hex digits), got {if_match[:80]!r}",
                       "validation")
    try:
        return validate_version(value)
    except InvalidTaskName as e:
        raise APIError(422, f"If-Match: {e}", "validation") from None


def etag_headers(version: str) -> dict[str, str]:
    """X-Prefix-Version and ETag (quoted) naming a version."""
    return {**version_headers(version), "ETag": f'"{version}"'}


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


def _own(caller: Caller, name: str) -> str:
    """The stored name a write of `name` goes to."""
    return candidates(caller, name, write=True)[0]


async def _check_storage(state: AppState, caller: Caller, stored: str, new: Manifest) -> None:
    """The caller's prefixes and prefix_bytes quotas, counting this upload (its own namespace only)."""
    ns = split_stored(stored)[0]
    if ns != caller.namespace or not (caller.limits.prefixes or caller.limits.prefix_bytes):
        return
    mine = {n: m for n, m in (await state.store.list()).items() if split_stored(n)[0] == ns and n != stored}
    state.quotas.check_storage(caller, len(mine) + 1, sum(m.nbytes for m in mine.values()) + new.nbytes)


async def _namespace_changed(state: AppState, stored: str) -> None:
    """After an upload into a tenant's namespace: bump its version, so no replica serves a request that starts
    from now on with the absence it remembered for this name (server/tiers/registry.py). If the bump fails, the
    store's watch events still reach every replica, a moment later."""
    ns = split_stored(stored)[0]
    if ns is None:
        return
    try:
        await state.tenants.namespace_changed(ns)
    except StoreError as e:
        logger.warning("stored %s but could not bump the version of namespace %s: %s", stored, ns, e)


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {  # read by read_upload
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                             "maxItems": MAX_PARTS, "description": "The adapter's or the native format's files"},
                   "description": {"type": "string", "description": "What the task is for"}}}}}}}


@router.put("/{name}", openapi_extra=UPLOAD_BODY, responses=error_responses(415))
async def put_prefix(name: NameParam, request: Request, state: StateDep, caller: CallerDep, if_match: IfMatch = None,
                     description: Annotated[str | None, Query(description="Replaces the description")] = None,
                     version: Annotated[str | None, Query(description="Move the task to this kept version "
                                                                      "instead of uploading (a rollback)",
                                                          json_schema_extra=VERSION_SCHEMA)] = None
                     ) -> JSONResponse:
    """Upload (or atomically replace) a task: a PEFT prefix/prompt-tuning or LoRA adapter, or the native format."""
    stored = _own(caller, name)
    expected = expected_version(if_match)
    if version is not None:
        return await _set_version(state, caller, request, name, stored, version, expected)
    limit = state.settings.max_upload_bytes
    files, form_description = await read_upload(request, limit)
    # parsed on a worker thread; the model work (prompt tuning) runs on the engine's thread between steps
    art = await asyncio.to_thread(artifact_from_files, files, state.loaded, max_bytes=limit,
                                  description=description or form_description,
                                  run_model=lambda work: state.engine.run_exclusive(work).result())
    if art.manifest.kind == LORA_KIND and state.engine.lora_refusal is not None:
        raise APIError(422, f"files: a LoRA adapter, but {state.engine.lora_refusal}", "validation")
    _, tensors = await asyncio.to_thread(art.to_bytes)
    async with state.quotas.storage_lock(caller):
        try:
            old: Manifest | None = await state.store.get_manifest(stored)
        except PrefixNotFound:
            old = None
        await _check_storage(state, caller, stored, art.manifest)
        m = await state.store.put(stored, art.manifest, tensors, expected_version=expected)
    state.tasks.remember(stored, m, previous=old)  # the old version leaves the device tier
    await _namespace_changed(state, stored)
    audit("prefix.put", tenant=caller.label, client=client_address(request), task=name, stored=stored,
          version=m.sha256, previous=old.sha256 if old else None, bytes=m.nbytes)
    logger.info("stored %s %s version %s (%s, %s)", "LoRA adapter" if m.kind == LORA_KIND else "prefix", stored,
                m.sha256[:12], m.source, f"r={m.lora['r']}" if m.kind == LORA_KIND else f"P={m.prefix_length}")
    return JSONResponse(manifest_body(name, m), status_code=201 if old is None else 200, headers=etag_headers(m.sha256))


async def _set_version(state: AppState, caller: Caller, request: Request, name: str, stored: str, version: str,
                       expected: str | None) -> JSONResponse:
    """Move the caller's `name` to one of its kept versions and answer its manifest."""
    try:
        m = await state.store.set_version(stored, validate_version(version), expected_version=expected)
    except VersionNotFound:
        raise VersionNotFound(name, version) from None
    except PrefixNotFound:
        raise PrefixNotFound(name) from None
    state.tasks.remember(stored, m)
    audit("prefix.rollback", tenant=caller.label, client=client_address(request), task=name, stored=stored,
          version=m.sha256)
    logger.info("prefix %s rolled to version %s", stored, m.sha256[:12])
    return JSONResponse(manifest_body(name, m), headers=etag_headers(m.sha256))


@router.post("/{name}/rollback")
async def rollback_prefix(name: NameParam, body: RollbackBody, request: Request, state: StateDep, caller: CallerDep,
                          if_match: IfMatch = None) -> JSONResponse:
    """Point the task back at one of its kept versions (see GET /prefixes/NAME/versions)."""
    stored = _own(caller, name)
    return await _set_version(state, caller, request, name, stored, body.version, expected_version(if_match))


@router.get("/{name}/versions")
async def list_versions(name: NameParam, state: StateDep, caller: CallerDep) -> dict[str, Any]:
    """The task's kept versions, newest first; `current` marks the one requests use."""
    async def read(stored: str, _: bool) -> tuple[list, str]:
        return await state.store.list_versions(stored), (await state.store.get_manifest(stored)).sha256

    _, (infos, current) = await first_found(caller, name, None, read)
    return {"task": name, "versions": [{"version": v.version, "created": v.created, "current": v.version == current,
                                        "manifest": json.loads(v.manifest.to_json())} for v in infos]}


@router.get("")
async def list_prefixes(state: StateDep, caller: CallerDep) -> dict[str, list[dict[str, Any]]]:
    """Every prefix the caller can use, by the name they use, with its manifest."""
    return {"prefixes": [manifest_body(n, m) for n, (_, m) in (await visible_tasks(state, caller)).items()]}


@router.get("/{name}")
async def get_prefix(ref: RefParam, state: StateDep, caller: CallerDep) -> JSONResponse:
    """One prefix's manifest (its current version, or NAME@VERSION)."""
    name, version = split_ref(ref)
    _, m = await first_found(caller, name, version, lambda stored, _: state.store.get_manifest(stored, version))
    return JSONResponse(manifest_body(name, m), headers=etag_headers(m.sha256))


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    return buf.getvalue()


@router.get("/{name}/download", response_class=Response)
async def download_prefix(ref: RefParam, state: StateDep, caller: CallerDep,
                          file: Annotated[str | None, Query(description=f"{MANIFEST_FILE} or {TENSORS_FILE}; "
                                                            "default: a zip of both",
                                                            json_schema_extra={"enum": [MANIFEST_FILE, TENSORS_FILE]})
                                          ] = None) -> Response:
    """The native artifact (manifest.json + prefix.safetensors), re-uploadable with PUT."""
    if file is not None and file not in (MANIFEST_FILE, TENSORS_FILE):
        raise APIError(422, f"file: must be {MANIFEST_FILE} or {TENSORS_FILE}", "validation")
    name, version = split_ref(ref)
    _, (m, tensors) = await first_found(caller, name, version, lambda stored, _: state.store.get(stored, version))
    files = {MANIFEST_FILE: m.to_json(), TENSORS_FILE: tensors}
    headers = etag_headers(m.sha256)
    if file is None:
        headers["Content-Disposition"] = f'attachment; filename="{name.replace(NAMESPACE_SEP, "-")}.zip"'
        return Response(await asyncio.to_thread(_zip, files), media_type="application/zip", headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{file}"'
    kind = "application/json" if file == MANIFEST_FILE else "application/octet-stream"
    return Response(files[file], media_type=kind, headers=headers)


@router.delete("/{name}")
async def delete_prefix(name: NameParam, request: Request, state: StateDep, caller: CallerDep,
                        if_match: IfMatch = None) -> dict[str, str]:
    """Remove a prefix and its versions; requests already running on it finish, new ones get 404."""
    stored = _own(caller, name)
    expected = expected_version(if_match)
    try:
        m = await state.store.get_manifest(stored)
        await state.store.delete(stored, expected_version=expected)
    except PrefixNotFound:
        raise PrefixNotFound(name) from None
    state.tasks.forget(stored, m.sha256)  # its version leaves the tiers unless another name shares it
    audit("prefix.delete", tenant=caller.label, client=client_address(request), task=name, stored=stored,
          version=m.sha256)
    return {"task": name, "deleted": m.sha256}
