"""Admin routes (admin keys only; anyone else gets 403): POST/GET /admin/keys, DELETE /admin/keys/ID,
GET /admin/tenants, PATCH /admin/tenants/NAME. Every change is written to the audit log."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from server.api.auth import AdminDep, AdminRoute
from server.api.deps import StateDep
from server.api.errors import APIError, error_responses, validation
from server.api.schemas import TENANT_SCHEMA
from server.tenants.audit import audit
from server.tenants.limits import overrides_schema

router = APIRouter(prefix="/admin", tags=["admin"], route_class=AdminRoute, responses=error_responses())
KeyIdParam = Annotated[str, Path(description="The key's id (the 12 hex digits after psk_)", max_length=64)]


class KeyCreate(BaseModel):
    """Body of POST /admin/keys."""

    tenant: str = Field(description="The key's tenant (created if new): 1-63 of a-z, 0-9, '_', '-'",
                        json_schema_extra=TENANT_SCHEMA)
    admin: bool = Field(False, description="Make the tenant an admin")
    label: str = Field("", max_length=200, description="What the key is for (shown in listings)")


class TenantUpdate(BaseModel):
    """Body of PATCH /admin/tenants/NAME."""

    admin: bool | None = Field(None, description="Set or clear the admin flag (absent: unchanged)")
    # checked by check_overrides, not coerced first (pydantic's float made `true` 1.0, so it was taken as 1)
    limits: dict[str, Any] = Field(default_factory=dict, description="Limit overrides (docs/tenants.md); null removes "
                                   "one, 0 = unlimited", json_schema_extra=overrides_schema())


def client_address(request: Request) -> str | None:
    """The client's address as the server sees it (the proxy's, behind one)."""
    return request.client.host if request.client else None


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request, state: StateDep, caller: AdminDep) -> dict[str, Any]:
    """Create a key for a tenant; the key is in this answer only (the server keeps its hash)."""
    try:
        key, record, tenant = await state.tenants.create_key(body.tenant, admin=body.admin, label=body.label)
    except ValueError as e:
        raise validation(f"tenant: {e}") from None
    audit("key.create", tenant=caller.label, client=client_address(request), key_id=record.id,
          key_tenant=record.tenant, admin=tenant.admin)
    return {"key": key, **record.public(), "admin": tenant.admin}


@router.get("/keys")
async def list_keys(state: StateDep, _: AdminDep,
                    tenant: Annotated[str | None, Query(max_length=64, description="Only this tenant's")] = None
                    ) -> dict[str, Any]:
    """Every key (ids, tenants, labels; never the keys or their hashes)."""
    return {"keys": [k.public() for k in await state.tenants.list_keys(tenant)]}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: KeyIdParam, request: Request, state: StateDep, caller: AdminDep) -> dict[str, Any]:
    """Revoke a key: every replica refuses it from its next request."""
    record = await state.tenants.revoke(key_id)
    if record is None:
        raise APIError(404, f"no key with id {key_id!r}", "not_found")
    audit("key.revoke", tenant=caller.label, client=client_address(request), key_id=record.id,
          key_tenant=record.tenant)
    return {"revoked": record.id, "tenant": record.tenant}


@router.get("/tenants")
async def list_tenants(state: StateDep, _: AdminDep) -> dict[str, Any]:
    """Every tenant: admin flag, limit overrides, effective limits, number of keys."""
    return {"tenants": await state.tenants.list_tenants()}


@router.patch("/tenants/{name}")
async def update_tenant(name: Annotated[str, Path(max_length=64, json_schema_extra=TENANT_SCHEMA)], body: TenantUpdate,
                        request: Request, state: StateDep, caller: AdminDep) -> JSONResponse:
    """Set a tenant's admin flag and limit overrides (creates the tenant if new)."""
    try:
        record = await state.tenants.update_tenant(name, admin=body.admin, limits=body.limits)
    except ValueError as e:
        raise validation(str(e)) from None
    audit("tenant.update", tenant=caller.label, client=client_address(request), target=record.name,
          admin=record.admin, limits=record.limits)
    return JSONResponse({"name": record.name, "admin": record.admin, "overrides": record.limits})
