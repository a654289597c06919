"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan owns model, engine, cache, store."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI

from prefix_store.base import open_store
from server.api import generate, health, openai, prefixes
from server.api.deps import AppState
from server.api.errors import install_error_handlers
from server.api.metrics import Metrics
from server.engine.engine import Engine, EngineConfig
from server.engine.model import load_model
from server.engine.prefix_cache import PrefixCache
from server.settings import Settings
from server.tiers.host import HostCache
from server.tiers.registry import TaskRegistry

logger = logging.getLogger(__name__)


def build_state(settings: Settings) -> AppState:
    """Load the model and create the engine (started), prefix cache, store and metrics (blocking; ~seconds)."""
    options = {} if settings.store_keep_versions is None else {"keep_versions": settings.store_keep_versions}
    store = open_store(settings.store, **options)
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else None
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype, cache_dir=cache_dir)
    eos = (loaded.tokenizer.eos_token_id,) if getattr(loaded.tokenizer, "eos_token_id", None) is not None else ()
    engine = Engine(loaded, EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                         max_seq_len=settings.max_seq_len,
                                         max_prefill_tokens=settings.max_prefill_tokens,
                                         kv_cache_bytes=settings.kv_cache_bytes, eos_token_ids=eos))
    cache = PrefixCache(settings.prefix_cache_bytes, loaded.device, loaded.dtype)
    metrics = Metrics(engine, cache)
    tasks = TaskRegistry(store, cache, HostCache(settings.host_cache_bytes), loaded.spec.fingerprint(),
                         settings.max_upload_bytes, on_load=metrics.cold_load)
    metrics.add_tiers(tasks)
    engine.start()
    logger.info("serving %s on %s (%s), store %s, max batch %d", settings.model, loaded.device, loaded.dtype,
                store.url, settings.max_batch_size)
    return AppState(settings, loaded, engine, cache, store, metrics, tasks)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create everything, follow the store, preload; on shutdown stop the watcher and the engine, close the store."""
    settings: Settings = app.state.settings
    state = await asyncio.to_thread(build_state, settings)
    watcher = asyncio.create_task(state.tasks.watch(), name="store-watch")
    try:
        await state.tasks.preload(settings.preload)
        app.state.prefixserve = state
        yield
    finally:
        app.state.prefixserve = None
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.to_thread(state.engine.stop)  # queued and running requests finish as 'cancelled'
        await state.store.close()
        logger.info("stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app (the model loads when the lifespan starts)."""
    settings = settings or Settings()
    app = FastAPI(title="prefixserve", version="0.1.0", lifespan=lifespan,
                  description="One frozen language model serving many prefix-tuned tasks. "
                              "TGI/LoRAX- and OpenAI-compatible; see docs/api.md.")
    app.state.settings = settings
    app.state.prefixserve = None
    install_error_handlers(app)
    for module in (health, generate, openai, prefixes):
        app.include_router(module.router)
    return app
