"""Authentication and the per-request quotas, as the dependency every API route has (health, metrics and docs
routes do not): `caller: CallerDep` in a route gives the authenticated Caller (server/tenants/namespaces.py);
`request.state.caller` holds it too. 401 for a missing or invalid key, 429 past requests_per_second or
concurrent_requests; the concurrency slot is held until the response (a stream too) has been sent."""
from __future__ import annotations

from typing import Annotated, AsyncIterator

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.api.deps import StateDep
from server.api.errors import APIError
from server.tenants.namespaces import Caller


BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (an API key from `prefixserve keys "
                                                   "create` or POST /admin/keys)")
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key in X-API-Key")


def presented_key(bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> str | None:
    """The key from `Authorization: Bearer KEY`, else from `X-API-Key: KEY`; None when neither is sent."""
    key = (bearer.credentials if bearer else "").strip() or (api_key or "").strip()
    return key or None


async def authenticate(request: Request, state: StateDep,
                       bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
                       api_key: Annotated[str | None, Depends(API_KEY)] = None) -> AsyncIterator[Caller]:
    """The request's Caller, counted against its rate and holding a concurrency slot while the request runs."""
    caller = await state.tenants.authenticate(presented_key(bearer, api_key))  # Unauthorized -> 401
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
