"""Per-tenant limits: defaults from the settings (`quota_<name>`), overridden per tenant; 0 means unlimited."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Limits:
    """What one tenant may use. Every field: 0 = no limit."""

    requests_per_second: float = 0.0  # token bucket, burst max(1, ceil(rate)); 429 + Retry-After
    tokens_per_minute: int = 0  # prompt + max_new_tokens reserved at admission, unused tokens refunded; 429
    concurrent_requests: int = 0  # requests in flight (a stream counts until it ends); 429
    prefixes: int = 0  # tasks in the tenant's namespace; 403 quota_exceeded on upload
    prefix_bytes: int = 0  # bytes of the current versions of those tasks; 403 quota_exceeded on upload
    max_prompt_tokens: int = 0  # longest prompt (tokens, per prompt); 422 naming the limit
    max_new_tokens: int = 0  # largest max_new_tokens / max_tokens; 422 naming the limit

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The defaults: each field from the setting `quota_<field>`."""
        return cls(**{f.name: getattr(settings, f"quota_{f.name}") for f in fields(cls)})

    def with_overrides(self, overrides: dict[str, Any]) -> Limits:
        """These limits with a tenant's overrides (checked names and values) applied."""
        return replace(self, **check_overrides(overrides))

    @property
    def burst(self) -> int:
        """Requests a tenant may send at once before the per-second rate applies."""
        return max(1, math.ceil(self.requests_per_second))


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def check_overrides(overrides: dict[str, Any]) -> dict[str, float | int]:
    """Validate {limit name: value >= 0}; raise ValueError naming the first bad entry."""
    out: dict[str, float | int] = {}
    types = {f.name: f.type for f in fields(Limits)}
    for name, value in overrides.items():
        if name not in types:
            raise ValueError(f"limits: unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"limits.{name}: must be a number >= 0 (0 = unlimited), got {value!r}")
        if types[name] == "int" and value != int(value):
            raise ValueError(f"limits.{name}: must be a whole number, got {value!r}")
        out[name] = int(value) if types[name] == "int" else float(value)
    return out
