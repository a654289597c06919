"""Per-tenant limits: defaults from the settings (`quota_<name>`), overridden per tenant; 0 means unlimited.

One field is a share rather than a limit: `weight`, the tenant's share of the engine under fair scheduling
(server/engine/scheduler.py). It is per tenant only (default 1, must be > 0): weights mean something only
relative to each other, so a server-wide default would change nothing."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Limits:
    """What one tenant may use. Every field but `weight`: 0 = no limit."""

    requests_per_second: float = 0.0  # token bucket, burst max(1, ceil(rate)); 429 + Retry-After
    tokens_per_minute: int = 0  # prompt + max_new_tokens reserved at admission, unused tokens refunded; 429
    concurrent_requests: int = 0  # requests in flight (a stream counts until it ends); 429
    prefixes: int = 0  # tasks in the tenant's namespace; 403 quota_exceeded on upload
    prefix_bytes: int = 0  # bytes of the current versions of those tasks; 403 quota_exceeded on upload
    max_prompt_tokens: int = 0  # longest prompt (tokens, per prompt); 422 naming the limit
    max_new_tokens: int = 0  # largest max_new_tokens / max_tokens; 422 naming the limit
    weight: float = 1.0  # fair-scheduling share (> 0): 2 = twice the tokens of a weight-1 tenant while both wait

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The defaults: each field from the setting `quota_<field>` (per-tenant-only fields keep theirs)."""
        return cls(**{f.name: getattr(settings, f"quota_{f.name}") for f in fields(cls)
                      if f.name not in TENANT_ONLY})

    def with_overrides(self, overrides: dict[str, Any]) -> Limits:
        """These limits with a tenant's overrides (checked names and values) applied."""
        return replace(self, **check_overrides(overrides))

    @property
    def burst(self) -> int:
        """Requests a tenant may send at once before the per-second rate applies."""
        return max(1, math.ceil(self.requests_per_second))


LIMIT_NAMES = tuple(f.name for f in fields(Limits))
TENANT_ONLY = ("weight",)  # no `quota_<name>` setting: set per tenant only
POSITIVE = ("weight",)  # must be > 0 (0 does not mean unlimited)


def overrides_schema() -> dict[str, Any]:
    """What check_overrides accepts, as JSON Schema (the OpenAPI schema of PATCH /admin/tenants/NAME's `limits`)."""
    types = {f.name: f.type for f in fields(Limits)}

    def one(name: str) -> dict[str, Any]:
        bound = "exclusiveMinimum" if name in POSITIVE else "minimum"
        return {"anyOf": [{"type": "integer" if types[name] == "int" else "number", bound: 0}, {"type": "null"}]}
    return {"properties": {name: one(name) for name in LIMIT_NAMES}, "additionalProperties": False}


def check_overrides(overrides: dict[str, Any]) -> dict[str, float | int]:
    """Validate {limit name: value >= 0 (> 0 for POSITIVE ones)}; raise ValueError naming the first bad entry."""
    out: dict[str, float | int] = {}
    types = {f.name: f.type for f in fields(Limits)}
    for name, value in overrides.items():
        if name not in types:
            raise ValueError(f"limits: unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if name in POSITIVE and not (number and value > 0):
            raise ValueError(f"limits.{name}: must be a number > 0 (1 = the default share), got {value!r}")
        if not (number and value >= 0):
            raise ValueError(f"limits.{name}: must be a number >= 0 (0 = unlimited), got {value!r}")
        if types[name] == "int" and value != int(value):
            raise ValueError(f"limits.{name}: must be a whole number, got {value!r}")
        out[name] = int(value) if types[name] == "int" else float(value)
    return out
