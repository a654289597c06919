"""How task names map to stored names for each caller (docs/tenants.md)."""
from __future__ import annotations

import pytest

from prefix_store.base import InvalidTaskName, PrefixNotFound, VersionNotFound, validate_task_name
from server.tenants.limits import Limits, check_overrides
from server.tenants.namespaces import (Caller, candidates, first_found, public_name, split_ref,
                                       validate_tenant_name)

ALICE = Caller("alice", False, Limits())
OPS = Caller("ops", True, Limits())
ANON = Caller("", False, Limits())


def test_candidates():
    assert candidates(ALICE, "e2e") == ["alice~e2e", "e2e"]  # own first, then shared
    assert candidates(ALICE, "e2e", write=True) == ["alice~e2e"]
    assert candidates(ANON, "e2e") == ["e2e"] == candidates(ANON, "e2e", write=True)  # owns the shared namespace
    assert candidates(OPS, "bob~e2e") == ["bob~e2e"] and candidates(OPS, "shared~e2e") == ["e2e"]
    for name in ("bob~e2e", "shared~e2e", "alice~e2e"):
        with pytest.raises(PrefixNotFound):
            candidates(ALICE, name)  # another namespace (even her own, spelled out) is not a tenant's to name
    for bad in ("", "a/b", ".x", "e2e~", "x" * 129, "ops~a~b"):
        with pytest.raises(InvalidTaskName):
            candidates(OPS, bad)
    with pytest.raises(InvalidTaskName):
        candidates(OPS, "Bad~e2e")
    assert split_ref("e2e@abcdef0") == ("e2e", "abcdef0")
    with pytest.raises(InvalidTaskName):
        split_ref("e2e@nothex!")


async def test_first_found_reads_the_candidates_in_order():
    """The caller's own name first (read as shadowing a shared one), then the shared one; none: named as asked."""
    stored = {"e2e": "shared", "bob~e2e": "bob's"}
    reads: list[tuple[str, bool]] = []

    async def read(name: str, shadowing: bool) -> str:
        reads.append((name, shadowing))
        if name not in stored:
            raise PrefixNotFound(name)
        return stored[name]

    assert await first_found(ALICE, "e2e", None, read) == ("e2e", "shared")
    assert reads == [("alice~e2e", True), ("e2e", False)]
    assert await first_found(Caller("bob", False, Limits()), "e2e", None, read) == ("bob~e2e", "bob's")
    with pytest.raises(PrefixNotFound, match="'x'"):
        await first_found(ALICE, "x", None, read)
    with pytest.raises(VersionNotFound) as e:
        await first_found(ALICE, "x", "abcdef0", read)
    assert (e.value.name, e.value.version) == ("x", "abcdef0")  # the caller's name, not the stored one


def test_public_names():
    names = {"e2e", "common", "alice~e2e", "bob~e2e", "bob~only"}
    seen = {n: public_name(ALICE, n, names) for n in names}
    assert seen == {"e2e": None, "common": "common", "alice~e2e": "e2e", "bob~e2e": None, "bob~only": None}
    seen = {n: public_name(OPS, n, names) for n in names}
    assert seen == {"e2e": "e2e", "common": "common", "alice~e2e": "alice~e2e", "bob~e2e": "bob~e2e",
                    "bob~only": "bob~only"}
    assert public_name(OPS, "e2e", names | {"ops~e2e"}) == "shared~e2e"  # shadowed by the admin's own


def test_names_and_limits_are_checked():
    assert validate_task_name("alice~e2e") and validate_tenant_name("team-1_a")
    for bad in ("Alice", "shared", "", "-x", "a" * 64, "a~b", "ops\n"):  # whole names: no trailing newline
        with pytest.raises(ValueError):
            validate_tenant_name(bad)
    with pytest.raises(InvalidTaskName):
        validate_task_name("Alice~e2e")  # a stored name's namespace is a valid tenant name
    assert check_overrides({"prefixes": 3.0, "requests_per_second": 2}) == {"prefixes": 3, "requests_per_second": 2.0}
    for bad in ({"prefixes": 1.5}, {"prefixes": True}, {"max_new_tokens": float("nan")}, {"nope": 1}):
        with pytest.raises(ValueError):
            check_overrides(bad)
    assert Limits(requests_per_second=0.2).burst == 1 and Limits(requests_per_second=2.5).burst == 3
