"""Authentication and the per-request quotas, as the dependency every API route has (health, metrics and docs
routes do not): `caller: CallerDep` in a route gives the authenticated Caller (server/tenants/namespaces.py);
`request.state.caller` holds it too. 401 for a missing or invalid key, 429 past requests_per_second or
concurrent_requests; the concurrency slot is held until the response (a stream too) has been sent.

The API routers use `AuthenticatedRoute`, which authenticates before the body is read or parsed: FastAPI reads
and parses a route's body before it runs any dependency, so otherwise a malformed, too deep or too large body
would be answered (422, 413) to a client without a valid key. With it, such a client gets 401 whatever its body."""
from __future__ import annotations

import hmac
from typing import Annotated, Any, AsyncIterator, Callable, Coroutine

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.api.deps import AppState, StateDep, get_state
from server.api.errors import APIError
from server.tenants.directory import Unauthorized
from server.tenants.namespaces import Caller


BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (an API key from `prefixserve keys "
                                                   "create` or POST /admin/keys)")
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key in X-API-Key")


def presented_key(bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> str | None:
    """The key from `Authorization: Bearer KEY`, else from `X-API-Key: KEY`; None when neither is sent."""
    key = (bearer.credentials if bearer else "").strip() or (api_key or "").strip()
    return key or None


async def identify(request: Request, state: AppState) -> Caller:
    """The request's Caller from its key (Unauthorized, 401, when auth is on and it has no valid one); looked up
    once per request and kept in `request.state.caller`."""
    caller = getattr(request.state, "caller", None)
    if caller is None:
        key = presented_key(await BEARER(request), await API_KEY(request))
        caller = request.state.caller = await state.tenants.authenticate(key)
    return caller


def _not_admin(caller: Caller) -> APIError:
    """What a non-admin gets from an admin route: a 403 saying why."""
    if not caller.tenant:
        return APIError(403, "admin routes need an admin API key, and auth is off (the store holds no keys): create "
                             "one with `prefixserve keys create --tenant NAME --admin` (docs/tenants.md)", "forbidden")
    return APIError(403, f"admin routes need an admin API key: this key's tenant {caller.tenant!r} is not an admin",
                    "forbidden")


class AuthenticatedRoute(APIRoute):
    """A route whose caller is identified (and, for `admin_only` routes, found to be an admin) before its body is
    read (the body's limits, server/api/limits.py, apply at that read) and parsed; the rest (quotas, the route)
    as for any route."""

    admin_only = False

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        reads_body = self.body_field is not None  # uploads stream their own body from inside the route

        async def authenticated(request: Request) -> Response:
            caller = await identify(request, get_state(request))
            if self.admin_only and not caller.admin:
                raise _not_admin(caller)
            if reads_body:
                await request.body()  # read and checked here, so its refusals are answered as themselves
            return await handler(request)

        return authenticated


class AdminRoute(AuthenticatedRoute):
    """An admin route: anyone else gets 403 whatever the body."""

    admin_only = True


async def authenticate(request: Request, state: StateDep,
                       bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
                       api_key: Annotated[str | None, Depends(API_KEY)] = None) -> AsyncIterator[Caller]:
    """The request's Caller, counted against its rate and holding a concurrency slot while the request runs.
    (`bearer` and `api_key` declare the two ways to send a key in the OpenAPI schema; `identify` reads them.)"""
    caller = await identify(request, state)  # Unauthorized -> 401
    await state.quotas.admit(caller)
    async with state.quotas.slot(caller):
        yield caller


CallerDep = Annotated[Caller, Depends(authenticate)]


def require_admin(caller: CallerDep) -> Caller:
    """The caller if it is an admin; anyone else gets 403."""
    if not caller.admin:
        raise _not_admin(caller)
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


async def metrics_reader(request: Request, state: StateDep,
                         bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
                         api_key: Annotated[str | None, Depends(API_KEY)] = None) -> None:
    """Let a scrape of /metrics through: anyone while no --metrics-key is set; else the metrics key (compared in
    constant time) or, with auth on, an admin API key; 401 otherwise."""
    wanted = state.settings.metrics_key
    key = presented_key(bearer, api_key)
    if not wanted or (key and hmac.compare_digest(key.encode(), wanted.encode())):
        return
    if key:
        try:
            caller = await identify(request, state)
        except Unauthorized:
            caller = None
        if caller is not None and caller.admin and caller.tenant:  # a tenant's admin key, not auth off's anonymous
            return
    raise Unauthorized("/metrics needs the metrics key (--metrics-key) or an admin API key: send "
                       "'Authorization: Bearer KEY'")
