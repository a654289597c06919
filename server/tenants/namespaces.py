"""Who is calling, and which stored prefix a task name means for them.

Stored names (prefix_store/base.py): `TASK` is a shared task, `TENANT~TASK` is TENANT's private task. So with
auth off (no tenants) every name stays as it always was, and tasks stored before tenants existed become the
shared tasks an admin publishes.

A caller names tasks as:
    TASK            reads: the caller's own TASK if it exists, else the shared TASK; writes: the caller's own
    NS~TASK         admins only: TENANT~TASK, or `shared~TASK` for the shared one (others get 404)
The anonymous caller (auth off) owns the shared namespace. Another tenant's private task is never reachable:
it resolves to a name that does not exist for the caller, so every route answers 404 and changes nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from prefix_store.base import (NAMESPACE_SEP, TENANT_NAME, InvalidTaskName, PrefixNotFound, VersionNotFound,
                               validate_task_name, validate_version)
from server.tenants.limits import Limits

T = TypeVar("T")

SHARED = "shared"  # the namespace word for shared tasks in `NS~TASK` (not a valid tenant name)
ANONYMOUS_LABEL = ":anonymous"  # the tenant label of the anonymous caller (':' cannot appear in a tenant name)
_TENANT = re.compile(TENANT_NAME)


def validate_tenant_name(name: str) -> str:
    """Return `name` if it is a valid tenant name (1-63 of a-z, 0-9, '_', '-'; not 'shared'); else ValueError."""
    if not isinstance(name, str) or not _TENANT.fullmatch(name) or name == SHARED:
        raise ValueError(f"invalid tenant name {str(name)[:80]!r}: use 1-63 of a-z, 0-9, '_', '-', starting with a "
                         f"letter or digit (not {SHARED!r})")
    return name


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request."""

    tenant: str  # "" for the anonymous caller (auth off)
    admin: bool
    limits: Limits
    key_id: str | None = None
    namespace_version: int | None = None  # of the tenant's namespace as this request began (prefix_store/keys.py)

    @property
    def namespace(self) -> str | None:
        """The caller's own namespace (None: the shared one, the anonymous caller's)."""
        return self.tenant or None

    @property
    def label(self) -> str:
        """The tenant as logs and metrics show it."""
        return self.tenant or ANONYMOUS_LABEL


def stored_name(namespace: str | None, task: str) -> str:
    """The store's name of `task` in `namespace` (None: shared)."""
    return task if namespace is None else f"{namespace}{NAMESPACE_SEP}{task}"


def split_stored(stored: str) -> tuple[str | None, str]:
    """(namespace or None for shared, task) of a stored name."""
    ns, sep, task = stored.partition(NAMESPACE_SEP)
    return (ns, task) if sep else (None, stored)


def _plain(task: str) -> str:
    if NAMESPACE_SEP in task:
        raise InvalidTaskName(f"invalid task name {task[:140]!r}: at most one {NAMESPACE_SEP!r}")
    return validate_task_name(task)


def candidates(caller: Caller, name: str, *, write: bool = False) -> list[str]:
    """The stored names `name` (no version) may mean for `caller`, in order; the first that exists wins.

    Raises InvalidTaskName (422) for a malformed name and PrefixNotFound (404) when a non-admin names a namespace.
    """
    if not isinstance(name, str):
        raise InvalidTaskName(f"invalid task name {str(name)[:80]!r}")
    ns, sep, task = name.partition(NAMESPACE_SEP)
    if sep:
        if not caller.admin:
            raise PrefixNotFound(name)
        if ns != SHARED:
            try:
                validate_tenant_name(ns)
            except ValueError as e:
                raise InvalidTaskName(str(e)) from None
        return [stored_name(None if ns == SHARED else ns, _plain(task))]
    own = stored_name(caller.namespace, _plain(name))
    if write or caller.namespace is None:
        return [own]
    return [own, name]


async def first_found(caller: Caller, name: str, version: str | None,
                      read: Callable[[str, bool], Awaitable[T]]) -> tuple[str, T]:
    """(stored name, `read(stored, shadowing)`) for the first of the caller's candidates for `name` that `read`
    finds (it raises PrefixNotFound for the others); `shadowing` is True while a shared name stands behind the one
    read. None found: PrefixNotFound, or VersionNotFound for a `version`, named as the caller named it."""
    names = candidates(caller, name)
    for i, stored in enumerate(names):
        try:
            return stored, await read(stored, i < len(names) - 1)
        except PrefixNotFound:
            continue
    raise VersionNotFound(name, version) if version else PrefixNotFound(name)


def split_ref(ref: str) -> tuple[str, str | None]:
    """`NAME@VERSION` -> (NAME, VERSION or None), the version checked (the name is checked by `candidates`)."""
    if not isinstance(ref, str):
        raise InvalidTaskName(f"invalid task reference {str(ref)[:80]!r}")
    name, sep, version = ref.partition("@")
    return name, (validate_version(version) if sep else None)


def public_name(caller: Caller, stored: str, names: set[str]) -> str | None:
    """How `caller` addresses the stored name `stored` (None: not visible to them); `names`: every stored name."""
    ns, task = split_stored(stored)
    own = stored_name(caller.namespace, task)
    if ns == caller.namespace:
        return task
    if ns is None and own not in names:
        return task  # a shared task the caller has no own task shadowing
    if caller.admin:
        return f"{ns or SHARED}{NAMESPACE_SEP}{task}"
    return None
