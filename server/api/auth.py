"""Authentication and the per-request quotas, as the dependency every API route has (health, metrics and docs
routes do not): `caller: CallerDep` in a route gives the authenticated Caller (server/tenants/namespaces.py);
`request.state.caller` holds it too. 401 for a missing or invalid key, 429 past requests_per_second or
concurrent_requests; the concurrency slot is held until the response (a stream too) has been sent."""
from __future__ import annotations

from typing import Annotated, AsyncIterator

from fastapi import Depends, Request

from server.api.deps import StateDep
from server.api.errors import APIError
from server.tenants.namespaces import Caller


def presented_key(request: Request) -> str | None:
    """The key from `Authorization: Bearer KEY` or else `X-API-Key: KEY`; None when neither is sent."""
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip() or None


async def authenticate(request: Request, state: StateDep) -> AsyncIterator[Caller]:
    """The request's Caller, counted against its rate and holding a concurrency slot while the request runs."""
    caller = await state.tenants.authenticate(presented_key(request))  # Unauthorized -> 401
    request.state.caller = caller
    await state.quotas.admit(caller)
    async with state.quotas.slot(caller):
        yield caller


CallerDep = Annotated[Caller, Depends(authenticate)]


def require_admin(caller: CallerDep) -> Caller:
    """The caller if it is an admin; anyone else gets the same 404 as a path that does not exist."""
    if not caller.admin:
        raise APIError(404, "Not Found", "http")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]
