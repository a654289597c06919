"""The engine's limits and switches (`EngineConfig`), in a module of their own so the engine and its runners both
import them without importing each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.settings import Settings


@dataclass
class EngineConfig:
    """Engine limits and switches; their defaults are the server's too (server/settings.py reads them here)."""

    max_batch_size: int = 32
    max_queue: int = 512
    max_seq_len: int = 2048  # capped by the model's own context length
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step (long prompts are prefilled in chunks)
    kv_cache_bytes: int = 4 * 2**30  # bound on the slot KV cache; admission waits rather than exceed it
    idle_release_s: float = 5.0  # after this long with nothing to do, the KV buffers shrink back
    eos_token_ids: tuple[int, ...] = ()
    request_timeout_s: float | None = None  # deadline of every request from submission (queued + generating)
    prompt_token_weight: float = 1.0  # fair scheduling: cost of a prompt token in a tenant's virtual counter
    output_token_weight: float = 2.0  # ... and of a generated token (VTC's defaults: output costs twice)
    fair_scheduling: bool = True  # False: one FIFO queue whatever the tenant (a baseline)
    reserved_rows: int = 0  # rows beyond max_batch_size for tenants that hold no row (scheduler.py; fair only)
    packed_weights: str = "auto"  # CPU fp32: run a copy of the model with prepacked weights (packed.py); on | off

    @property
    def row_capacity(self) -> int:
        """Rows the running batch (and the KV cache) can hold: max_batch_size, plus the reserved rows (fair)."""
        return self.max_batch_size + (self.reserved_rows if self.fair_scheduling else 0)

    @classmethod
    def from_settings(cls, settings: Settings, eos_token_ids: tuple[int, ...] = ()) -> EngineConfig:
        """The engine's part of the server's settings (`eos_token_ids`: the tokenizer's, beside the model's own)."""
        return cls(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                   max_seq_len=settings.max_seq_len, max_prefill_tokens=settings.max_prefill_tokens,
                   kv_cache_bytes=settings.kv_cache_bytes, eos_token_ids=eos_token_ids,
                   request_timeout_s=settings.request_timeout_s,
                   prompt_token_weight=settings.scheduler_prompt_weight,
                   output_token_weight=settings.scheduler_output_weight,
                   fair_scheduling=settings.scheduler == "fair", reserved_rows=settings.scheduler_reserved_rows,
                   packed_weights=settings.packed_weights)
