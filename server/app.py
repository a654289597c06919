"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan owns model, engine, cache, store."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import torch
from fastapi import Depends, FastAPI

from basemodel.model import load_model
from prefix_store.backend import open_backend
from prefix_store.base import StoreError
from server import ui
from server.api import admin, generate, health, openai, prefixes, replicas
from server.api.auth import authenticate
from server.api.deps import AppState
from server.api.errors import install_error_handlers
from server.api.limits import LimitSettings, RequestLimits
from server.api.metrics import MeteredStore, MetricLabels, Metrics
from server.engine.engine import Engine, EngineConfig
from server.engine.payload import device_payload
from server.engine.quant_runner import load_quantized, resolve_quantization
from server.settings import Settings
from server.tenants.audit import add_audit_file
from server.tenants.directory import TenantDirectory
from server.tenants.limits import Limits
from server.tenants.quotas import Quotas
from server.tiers.registry import TaskRegistry
from server.tiers.tiers import Tiers

logger = logging.getLogger(__name__)


def build_metrics(settings: Settings, engine: Engine, tiers: Tiers) -> Metrics:
    """The app's metrics, labelled as the settings allow (a warning when private names are on an open /metrics)."""
    labels = MetricLabels(settings.metrics_max_tenants, settings.metrics_tenant_labels,
                          settings.metrics_task_labels == "all")
    if (labels.tenants or labels.private_tasks) and not settings.metrics_key:
        logger.warning("/metrics names tenants or their own tasks and needs no key: anyone who can reach it reads "
                       "them. Set PREFIXSERVE_METRICS_KEY (Prometheus: authorization: credentials).")
    return Metrics(engine, tiers.device, labels)


def build_state(settings: Settings) -> AppState:
    """Load the model and create the engine (started), prefix cache, store and metrics (blocking; ~seconds)."""
    options = {} if settings.store_keep_versions is None else {"keep_versions": settings.store_keep_versions}
    backend = open_backend(settings.store, **options)
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else None
    if resolve_quantization(settings.quantization, settings.model, settings.device) == "q4":
        loaded = load_quantized(settings.model, cache_dir)
        # the kernels run the forward on threads of their own (loaded.model.threads, torch's count until now);
        # torch's OpenMP threads, left free, would spin beside them after every small torch op (2-3x slower steps)
        torch.set_num_threads(1)
    else:
        loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype, cache_dir=cache_dir)
    eos = (loaded.tokenizer.eos_token_id,) if getattr(loaded.tokenizer, "eos_token_id", None) is not None else ()
    engine = Engine(loaded, EngineConfig.from_settings(settings, eos_token_ids=eos))
    tiers = Tiers(settings.prefix_cache_bytes, settings.host_cache_bytes,
                  lambda version, art: device_payload(version, art, loaded.device, loaded.dtype))
    metrics = build_metrics(settings, engine, tiers)
    store = MeteredStore(backend.prefixes, metrics)  # every prefix store call timed, its failures counted
    tasks = TaskRegistry(store, tiers, loaded.spec.fingerprint(), settings.max_upload_bytes,
                         on_load=metrics.cold_load)
    metrics.add_tiers(tasks)
    engine.start()
    logger.info("serving %s on %s (%s, quantization %s), store %s, max batch %d", settings.model, loaded.device,
                loaded.dtype, loaded.quantization, backend.url, settings.max_batch_size)
    tenants = TenantDirectory(backend.keys, Limits.from_settings(settings), settings.auth)
    return AppState(settings, loaded, engine, tiers, store, metrics, tasks, tenants,
                    Quotas(backend.counters), replicas=backend.replicas)


async def log_auth_mode(state: AppState) -> None:
    """Say whether requests need keys; loudly when they do not."""
    try:
        enabled = await state.tenants.enabled()
    except StoreError as e:  # requests will tell (401 or 503) once the store answers
        logger.warning("cannot tell whether auth is on: %s", e)
        return
    if enabled:
        logger.info("auth on (%s): requests need an API key", "required" if state.settings.auth == "required"
                    else "the store holds tenants")
        return
    logger.warning("AUTH IS OFF: the store %s holds no API keys, so anyone who can reach this server may use, "
                   "upload and delete every prefix. Create a key with `prefixserve keys create --tenant NAME "
                   "--admin --store ...` (auth turns on at once) or set PREFIXSERVE_AUTH=required.",
                   state.store.url)


ENGINE_WATCH_S = 0.2  # how often the lifespan checks that the engine thread is alive
EXIT_ENGINE_FAILED = 70  # the process's exit status when the engine died (EX_SOFTWARE)


async def watch_engine(app: FastAPI, state: AppState) -> None:
    """If the engine thread dies, have the server drain and exit non-zero (/ready already answers 503), so an
    orchestrator restarts the process instead of routing requests to a server that can only refuse them."""
    while not state.engine.dead:
        await asyncio.sleep(ENGINE_WATCH_S)
    logger.critical("the engine failed (%s): shutting down with exit status %d", state.engine.failure,
                    EXIT_ENGINE_FAILED)
    app.state.exit_code = EXIT_ENGINE_FAILED
    request_shutdown = getattr(app.state, "request_shutdown", None)
    if request_shutdown is not None:  # set by `prefixserve serve`; an embedding application decides itself
        request_shutdown()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create everything, follow the store, preload; on shutdown stop the watcher and the engine, close the store."""
    settings: Settings = app.state.settings
    state = await asyncio.to_thread(build_state, settings)
    watcher = asyncio.create_task(state.tasks.watch(), name="store-watch")
    engine_watch = asyncio.create_task(watch_engine(app, state), name="engine-watch")
    beat = asyncio.create_task(replicas.heartbeat(state, state.replicas), name="replica-heartbeat")
    audit_file = add_audit_file(settings.audit_log) if settings.audit_log else None
    try:
        await log_auth_mode(state)
        await state.tasks.preload(settings.preload)
        app.state.prefixserve = state
        yield
    finally:
        app.state.prefixserve = None
        watcher.cancel()
        engine_watch.cancel()
        beat.cancel()
        await asyncio.gather(watcher, engine_watch, beat, return_exceptions=True)
        await asyncio.to_thread(state.engine.stop)  # queued and running requests finish as 'cancelled'
        state.tokenizing.close()
        await state.store.close()
        if audit_file is not None:
            logging.getLogger("prefixserve.audit").removeHandler(audit_file)
            audit_file.close()
        logger.info("stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app (the model loads when the lifespan starts)."""
    settings = settings or Settings()
    app = FastAPI(title="prefixserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="One frozen language model serving many prefix-tuned tasks. "
                              "TGI/LoRAX- and OpenAI-compatible; see docs/api.md.")
    app.state.settings = settings
    app.state.prefixserve = None
    app.state.exit_code = 0  # EXIT_ENGINE_FAILED once the engine has died
    install_error_handlers(app)
    app.add_middleware(RequestLimits, limits=LimitSettings(  # body size/time, JSON depth, slow clients
        settings.max_body_bytes, settings.max_upload_bytes, settings.max_json_depth, settings.client_timeout_s,
        settings.request_timeout_s))
    app.include_router(health.router)  # open: /health, /ready, /metrics (and FastAPI's /openapi.json)
    ui.install(app)  # open: the console at /ui, Swagger UI at /docs (local assets)
    for module in (generate, openai, prefixes, replicas, admin):  # every other route needs a key once auth is on
        app.include_router(module.router, dependencies=[Depends(authenticate)])
    return app
