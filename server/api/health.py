"""GET /health (process alive), GET /ready (model loaded, engine running; store state), GET /metrics."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.auth import metrics_reader
from server.api.deps import StateDep
from server.api.errors import ErrorBody, error_responses

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive (answers even while the model loads)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorBody, "description": "Not ready: loading, draining or failed"}})
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine runs (status `degraded` while the store is unreachable:
    cached tasks still serve, so the replica stays in rotation); 503 before start-up ends, during shutdown, and
    once the engine has failed (the process then drains and exits non-zero)."""
    state = getattr(request.app.state, "prefixserve", None)
    if state is None or not state.engine.running or state.engine.dead:
        failed = state is not None and state.engine.dead
        return JSONResponse({"error": f"the engine failed: {state.engine.failure}" if failed else "not ready",
                             "error_type": "unavailable"}, status_code=503, headers={"Retry-After": "1"})
    store = await state.tasks.store_health()
    t = state.tasks
    return JSONResponse({"status": "ready" if store["ok"] else "degraded", "model": state.model_id,
                         "device": str(state.loaded.device), "quantization": state.loaded.quantization,
                         "max_seq_len": state.engine.max_seq_len,
                         "store": {"url": state.store.url, **store, "last_resync": t.stats.last_resync or None},
                         "cached": {"tasks": len(t.manifests), "device_prefixes": len(state.tiers.device),
                                    "host_prefixes": len(t.tiers.host)}})


@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_reader)],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}, **error_responses(401)},
            openapi_extra={"security": [{}]})  # FastAPI appends it: a key is optional until --metrics-key is set
async def metrics(state: StateDep) -> Response:
    """Prometheus text format: requests, tokens, queue depth, batch size, latencies, prefix cache (with
    --metrics-key: needs that key or an admin API key as 'Authorization: Bearer KEY')."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
