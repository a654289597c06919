"""Errors as TGI returns them, `{"error": "...", "error_type": "..."}`, on the OpenAI routes (/v1/*) as OpenAI
returns them, `{"error": {"message", "type", "param", "code"}}`, and the handlers mapping our exceptions."""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from prefix_store.artifact import ArtifactError, ArtifactTooLarge
from prefix_store.base import InvalidTaskName, PrefixNotFound, StoreError, StoreUnavailable, VersionConflict
from server.engine.request import EngineOverloaded, EngineStopped
from server.tenants.directory import Unauthorized
from server.tenants.quotas import LimitExceeded, QuotaExceeded

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error with its HTTP status and TGI error_type (validation, not_found, overloaded, ...)."""

    def __init__(self, status: int, message: str, error_type: str = "validation",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers


def validation(message: str) -> APIError:
    """A 422 naming the bad field in its message."""
    return APIError(422, message, "validation")


OPENAI_PREFIX = "/v1/"
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_PARAM = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")  # our messages name the bad field first: "prompt: ..."


def error_body(message: str, error_type: str) -> dict[str, str]:
    """The JSON body of every TGI-route error (also sent as the last SSE event of a failed stream)."""
    return {"error": message, "error_type": error_type}


def openai_error_body(status: int, message: str, error_type: str) -> dict[str, dict[str, str | None]]:
    """OpenAI's error object: `type` from the status, `code` our error_type, `param` the field the message names
    (on these routes the task is `model`)."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    match = _PARAM.match(message)
    param = match.group(1) if match else ("model" if error_type == "not_found" else None)
    return {"error": {"message": message, "type": kind, "param": "model" if param == "task" else param,
                      "code": error_type}}


def is_openai_path(path: str) -> bool:
    """Whether errors on `path` take OpenAI's shape (the /v1/* routes)."""
    return path.startswith(OPENAI_PREFIX)


def error_payload(path: str, status: int, message: str, error_type: str) -> dict:
    """The error body for a request to `path`: OpenAI's shape on /v1/*, TGI's elsewhere."""
    return openai_error_body(status, message, error_type) if is_openai_path(path) else error_body(message, error_type)


class ErrorBody(BaseModel):
    """TGI's error body (every route but /v1/*)."""

    error: str
    error_type: str


class OpenAIError(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorBody(BaseModel):
    """OpenAI's error body (the /v1/* routes)."""

    error: OpenAIError


_STATUSES = {
    400: "Malformed request: a body that is not JSON, a bad Content-Length or multipart body",
    401: "Missing or invalid API key (auth on)",
    403: "Not allowed: an admin route without an admin key, or past a tenant's quota",
    404: "No such task, version or key (another tenant's private task is 404 too)",
    408: "The body did not arrive within the client timeout",
    412: "If-Match: the task is not at that version",
    413: "Body larger than the limit (--max-body-bytes, --max-upload-bytes)",
    415: "An upload that is not multipart/form-data",
    422: "Invalid field: the message names it",
    429: "Past the tenant's requests_per_second or concurrent_requests (Retry-After)",
    503: "Overloaded (queue full), not ready, or the prefix store unreachable (Retry-After)",
    504: "No response (or generation not finished) within the request timeout (--request-timeout-s)",
}
COMMON_ERRORS = (400, 401, 403, 404, 408, 413, 422, 429, 503, 504)  # limits, auth, quotas, store: every API route


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict]:
    """OpenAPI `responses=` for the error statuses a route answers (default COMMON_ERRORS), in its error shape."""
    model = OpenAIErrorBody if openai else ErrorBody
    return {status: {"model": model, "description": _STATUSES[status]} for status in statuses or COMMON_ERRORS}


def to_api_error(exc: Exception) -> APIError:
    """Map a known exception to its APIError; unknown ones become a 500 (a server fault, never client input)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, Unauthorized):
        return APIError(401, str(exc), "unauthorized", {"WWW-Authenticate": 'Bearer realm="prefixserve"'})
    if isinstance(exc, QuotaExceeded):
        return APIError(429, str(exc), "quota_exceeded", {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, LimitExceeded):
        return APIError(exc.status, str(exc), "quota_exceeded" if exc.status == 403 else "validation")
    if isinstance(exc, PrefixNotFound):
        return APIError(404, str(exc), "not_found")
    if isinstance(exc, InvalidTaskName):
        return APIError(422, f"task: {exc}", "validation")
    if isinstance(exc, ArtifactTooLarge):
        return APIError(413, f"{exc} (the limit is set by --max-upload-bytes)", "too_large")
    if isinstance(exc, ArtifactError):
        return APIError(422, str(exc), "validation")
    if isinstance(exc, EngineOverloaded):
        return APIError(503, str(exc), "overloaded", {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), "unavailable", {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, VersionConflict):  # not a StoreError: the store works, the precondition failed
        headers = {"ETag": f'"{exc.found}"'} if exc.found else None
        return APIError(412, str(exc), "precondition_failed", headers)
    if isinstance(exc, StoreUnavailable):
        return APIError(503, f"prefix store unavailable: {exc}", "store",
                        {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, StoreError):
        return APIError(503, f"prefix store error: {exc}", "store", {"Retry-After": str(RETRY_AFTER_SECONDS)})
    logger.error("internal error", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__})", "internal")


def error_response(exc: Exception, path: str = "") -> JSONResponse:
    """A JSONResponse for any exception, in the error shape of `path`'s routes."""
    err = to_api_error(exc)
    return JSONResponse(error_payload(path, err.status, err.message, err.error_type), status_code=err.status,
                        headers=err.headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> str:
    """Every method some route of the app has for the request's path (its `Allow` header when the method is not)."""
    return ", ".join(m for m in HTTP_METHODS if any(route.matches({**request.scope, "method": m})[0] == Match.FULL
                                                    for route in request.app.router.routes))


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so every error leaves in its routes' JSON shape (OpenAI's or TGI's) with the right status."""

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_payload(request.url.path, 422, _validation_message(exc), "validation"),
                            status_code=422)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette's Allow names the first route of the path only (PUT /prefixes/NAME)
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return JSONResponse(error_payload(request.url.path, exc.status_code, str(exc.detail), "http"),
                            status_code=exc.status_code, headers=headers)

    async def on_known(request: Request, exc: Exception) -> JSONResponse:
        response = error_response(exc, request.url.path)
        state = getattr(request.app.state, "prefixserve", None)
        if state is not None:
            route = request.scope.get("route")
            caller = getattr(request.state, "caller", None)
            state.metrics.error(getattr(route, "path", "unmatched"), response.status_code,
                                caller.label if caller else "")
        return response

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (APIError, PrefixNotFound, InvalidTaskName, ArtifactError, EngineOverloaded, EngineStopped,
                StoreError, VersionConflict, Unauthorized, QuotaExceeded, LimitExceeded, Exception):
        app.add_exception_handler(cls, on_known)
