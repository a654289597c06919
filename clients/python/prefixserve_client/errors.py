"""Errors raised by the client: each carries the HTTP status and the server's `error` and `error_type`."""
from __future__ import annotations

from typing import Any

import httpx


class PrefixServeError(Exception):
    """A request the server refused or that could not be completed."""

    def __init__(self, message: str, status: int | None = None, error_type: str | None = None,
                 retry_after: float | None = None, body: Any = None):
        super().__init__(message if status is None else f"{status} {error_type or 'error'}: {message}")
        self.message, self.status, self.error_type = message, status, error_type
        self.retry_after, self.body = retry_after, body


class BadRequestError(PrefixServeError):
    """400/413/415/422: the request or the uploaded artifact is invalid (the message names the field)."""


class AuthenticationError(PrefixServeError):
    """401/403: missing or wrong API key."""


class QuotaExceededError(PrefixServeError):
    """403 quota_exceeded: an upload would pass the tenant's storage quota (number or bytes of prefixes)."""


class NotFoundError(PrefixServeError):
    """404: unknown task, prefix or version."""


class ConflictError(PrefixServeError):
    """409/412: someone else changed the prefix (optimistic concurrency)."""


class RateLimitError(PrefixServeError):
    """429: a quota was exceeded; `retry_after` says when to come back."""


class UnavailableError(PrefixServeError):
    """503: overloaded, starting, stopping or the store is down; `retry_after` says when to come back."""


class ServerError(PrefixServeError):
    """500 and other unexpected statuses."""


class ConnectionFailed(PrefixServeError):
    """The server could not be reached or did not answer in time."""


_BY_STATUS: dict[int, type[PrefixServeError]] = {
    400: BadRequestError, 413: BadRequestError, 415: BadRequestError, 422: BadRequestError,
    401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError, 409: ConflictError,
    412: ConflictError, 429: RateLimitError, 503: UnavailableError,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    from datetime import datetime, timezone

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def error_from_body(status: int, body: Any, retry_after: float | None = None) -> PrefixServeError:
    """The typed error for a status and a decoded JSON body (TGI's `{"error", "error_type"}` or OpenAI's)."""
    message, error_type = f"HTTP {status}", None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):  # OpenAI's shape (/v1/*): {"error": {"message", "type", "param", "code"}}
            message, error_type = str(err.get("message", message)), err.get("code") or err.get("type")
        elif err is not None:
            message, error_type = str(err), body.get("error_type")
        elif "detail" in body:
            message = str(body["detail"])
    elif isinstance(body, str) and body.strip():
        message = body.strip()[:500]
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else PrefixServeError)
    if status == 403 and error_type == "quota_exceeded":
        cls = QuotaExceededError
    return cls(message, status, error_type, retry_after, body)


def error_from_response(response: httpx.Response) -> PrefixServeError:
    """The typed error for a non-2xx response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_body(response.status_code, body, parse_retry_after(response.headers.get("retry-after")))
