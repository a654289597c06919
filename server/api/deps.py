"""What the routes depend on: the app's state (model, engine, tiers, store, task registry), as named types."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Coroutine

from fastapi import Depends, Request

from basemodel.model import LoadedModel
from prefix_store.base import PrefixStore
from prefix_store.replicas import ReplicaRecord, Replicas
from server.api.errors import APIError
from server.api.metrics import Metrics
from server.api.tokenize import Tokenizing
from server.engine.engine import Engine
from server.settings import Settings
from server.tenants.directory import TenantDirectory
from server.tenants.quotas import Quotas
from server.tiers.registry import TaskRegistry
from server.tiers.tiers import Tiers


@dataclass
class AppState:
    """Everything the lifespan creates; one per app."""

    settings: Settings
    loaded: LoadedModel
    engine: Engine
    tiers: Tiers
    store: PrefixStore
    metrics: Metrics
    tasks: TaskRegistry
    tenants: TenantDirectory
    quotas: Quotas
    background: set[asyncio.Task] = field(default_factory=set)  # work that outlives its request (see spawn)
    replicas: Replicas | None = None  # the backend's registry of live replicas (GET /replicas)
    replica: ReplicaRecord | None = None  # this replica's own record, once published
    tokenizing: Tokenizing = field(init=False)  # prompts to ids, off the event loop (closed by the lifespan)

    def __post_init__(self) -> None:
        self.tokenizing = Tokenizing(self.loaded.tokenizer, self.settings.max_prompt_bytes)

    def spawn(self, work: Coroutine) -> asyncio.Task:
        """Run `work` as a task kept until it ends, whatever becomes of the request that started it (booking a
        generation whose client went away)."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    @property
    def model_id(self) -> str:
        """The base model's public name (a local directory is shown by its last component)."""
        name = self.loaded.name
        return Path(name).name if Path(name).is_dir() else name

    @property
    def tokenizer(self):
        """The model's tokenizer; text routes need one."""
        if self.loaded.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: text generation is unavailable", "validation")
        return self.loaded.tokenizer


def get_state(request: Request) -> AppState:
    """The app's state, or 503 while the model is still loading."""
    state = getattr(request.app.state, "prefixserve", None)
    if state is None:
        raise APIError(503, "the server is starting", "unavailable", {"Retry-After": "1"})
    return state


StateDep = Annotated[AppState, Depends(get_state)]
