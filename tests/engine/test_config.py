"""The engine's settings have one home: the server's defaults are EngineConfig's, and from_settings carries every
engine setting across (no hand copying in the app)."""
from __future__ import annotations

from dataclasses import fields, replace

from server.engine.config import EngineConfig
from server.settings import Settings


def test_the_server_defaults_are_the_engines(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(f"PREFIXSERVE_{name.upper()}", raising=False)
    s = Settings()
    got = EngineConfig.from_settings(s, eos_token_ids=(2,))
    # the one default that differs on purpose: a library engine has no deadline, the server has one
    assert got == replace(EngineConfig(), eos_token_ids=(2,), request_timeout_s=s.request_timeout_s)


def test_every_engine_setting_reaches_the_engine():
    s = Settings(max_batch_size=7, max_queue=9, max_seq_len=100, max_prefill_tokens=11, kv_cache_bytes=2**21,
                 request_timeout_s=3.5, scheduler_prompt_weight=0.5, scheduler_output_weight=4.0, scheduler="fifo",
                 scheduler_reserved_rows=2, packed_weights="off")
    got = EngineConfig.from_settings(s)
    assert got == EngineConfig(max_batch_size=7, max_queue=9, max_seq_len=100, max_prefill_tokens=11,
                               kv_cache_bytes=2**21, request_timeout_s=3.5, prompt_token_weight=0.5,
                               output_token_weight=4.0, fair_scheduling=False, reserved_rows=2, packed_weights="off")
    changed = {f.name for f in fields(EngineConfig) if getattr(got, f.name) != getattr(EngineConfig(), f.name)}
    assert changed == {f.name for f in fields(EngineConfig)} - {"idle_release_s", "eos_token_ids"}
