"""`prefixserve keys create|list|revoke` and `prefixserve tenants list|set`, on the store's backend (--store)."""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
from typing import Any, Awaitable, Callable

from server.settings import Settings
from server.tenants.audit import audit
from server.tenants.directory import TenantDirectory
from server.tenants.keys import key_id
from server.tenants.limits import LIMIT_NAMES


def _run(args: argparse.Namespace, work: Callable[[TenantDirectory], Awaitable[Any]]) -> Any:
    """Open the store named by --store (or PREFIXSERVE_STORE, or the default) and run `work` on its directory."""
    from prefix_store.backend import open_backend
    from server.tenants.limits import Limits

    settings = Settings.from_args(args)

    async def run() -> Any:
        backend = open_backend(settings.store)
        try:
            return await work(TenantDirectory(backend.keys, Limits.from_settings(settings), settings.auth))
        finally:
            await backend.close()

    return asyncio.run(run())


def _client() -> str:
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create a key; the key itself is printed alone on the last line (and never again)."""
    key, record, tenant = _run(args, lambda d: d.create_key(args.tenant, admin=args.admin, label=args.label))
    audit("key.create", tenant="cli", client=_client(), key_id=record.id, key_tenant=record.tenant,
          admin=tenant.admin)
    print(f"created key {record.id} for tenant {tenant.name}{' (admin)' if tenant.admin else ''}; "
          "it is shown only now, store it safely:")
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """One JSON object per key (id, tenant, created, label; never the key or its hash)."""
    for k in _run(args, lambda d: d.list_keys(args.tenant)):
        print(json.dumps(k.public()))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by its id (or by the key itself)."""
    kid = key_id(args.key) or args.key
    record = _run(args, lambda d: d.revoke(kid))
    if record is None:
        raise KeyError(f"no key with id {kid!r}")
    audit("key.revoke", tenant="cli", client=_client(), key_id=record.id, key_tenant=record.tenant)
    print(json.dumps({"revoked": record.id, "tenant": record.tenant}))
    return 0


def cmd_tenants_list(args: argparse.Namespace) -> int:
    """One JSON object per tenant with its effective limits."""
    for t in _run(args, lambda d: d.list_tenants()):
        print(json.dumps(t))
    return 0


def _limit(text: str) -> tuple[str, float | None]:
    name, sep, value = text.partition("=")
    if not sep or name not in LIMIT_NAMES:
        raise argparse.ArgumentTypeError(f"give NAME=VALUE (or NAME= to drop an override), NAME one of "
                                         f"{', '.join(LIMIT_NAMES)}")
    try:
        return name, float(value) if value else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: not a number: {value!r}") from None


def cmd_tenants_set(args: argparse.Namespace) -> int:
    """Set a tenant's admin flag and limit overrides."""
    limits = dict(args.limit or [])
    record = _run(args, lambda d: d.update_tenant(args.name, admin=args.admin, limits=limits))
    audit("tenant.update", tenant="cli", client=_client(), target=record.name, admin=record.admin,
          limits=record.limits)
    print(json.dumps({"name": record.name, "admin": record.admin, "overrides": record.limits}))
    return 0


def register(sub: Any) -> None:
    """Add the `keys` and `tenants` subcommands to the `prefixserve` CLI."""
    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=None, help="store directory or redis:// URL (env PREFIXSERVE_STORE)")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("create", help="create a key for a tenant (created if new); prints the key last")
    p.add_argument("--tenant", required=True)
    p.add_argument("--admin", action="store_true", help="make the tenant an admin")
    p.add_argument("--label", default="", help="what the key is for")
    store_arg(p)
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list", help="list keys (ids and tenants, never the keys)")
    p.add_argument("--tenant", default=None)
    store_arg(p)
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke a key (by id or the key itself); every replica refuses it at once")
    p.add_argument("key")
    store_arg(p)
    p.set_defaults(func=cmd_keys_revoke)

    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="tenants_command", required=True)
    p = tenants.add_parser("list", help="list tenants with their limits")
    store_arg(p)
    p.set_defaults(func=cmd_tenants_list)
    p = tenants.add_parser("set", help="set a tenant's admin flag and limit overrides")
    p.add_argument("name")
    p.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--limit", type=_limit, action="append", metavar="NAME=VALUE",
                   help=f"override a limit (0 = unlimited; weight: the fair-scheduling share, > 0, default 1; "
                        f"empty = back to the default): {', '.join(LIMIT_NAMES)}")
    store_arg(p)
    p.set_defaults(func=cmd_tenants_set)
