"""Prometheus metrics of one app (its own registry: no global state), labelled by task and tenant.

Labels name nothing private unless the operator asks (`MetricLabels`): by default every tenant with a key is
':tenant' and a tenant's own task is ':private' (shared tasks, the base model and ':anonymous' are named). Named
tenants are bounded: the first `max_tenants` seen are named, later ones are counted as ':other' (tenants exist
only when an admin creates them, so this bounds a deployment that has very many)."""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prefix_store.base import PrefixStore, StoreError, StoreUnavailable
from server.tenants.namespaces import ANONYMOUS_LABEL

if TYPE_CHECKING:
    from server.engine.engine import Engine
    from server.tiers.lru import ByteLRU
    from server.tiers.registry import TaskRegistry

BASE_LABEL = ":base"  # the task label of requests without a task (':' cannot appear in a task name)
OTHER_TENANTS = ":other"  # the tenant label past max_tenants
TENANTS = ":tenant"  # the tenant label of every tenant with a key, unless tenants are named
PRIVATE_TASK = ":private"  # the task label of a tenant's own task, unless every task is named
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass(frozen=True)
class MetricLabels:
    """What the labels may name (the operator's choice: server settings metrics_*)."""

    max_tenants: int = 100
    tenants: bool = False  # name tenants (else every tenant with a key is TENANTS)
    private_tasks: bool = False  # name a tenant's own tasks (else PRIVATE_TASK)


class _EngineCollector:
    """Reads the engine's and the prefix cache's live values at scrape time."""

    def __init__(self, engine: Engine, cache: ByteLRU, tenant_label: Callable[[str], str]):
        self.engine, self.cache, self.tenant_label = engine, cache, tenant_label
        self._queued: set[str] = set()  # tenant labels shown before: they stay, at 0 when nothing waits

    def collect(self) -> Iterator:
        e, c = self.engine, self.cache
        yield GaugeMetricFamily("prefixserve_queue_depth", "Requests waiting for a batch row", value=e.queue_depth)
        yield self._tenant_queue_depths()
        yield GaugeMetricFamily("prefixserve_batch_size", "Rows in the running batch", value=e.batch_size)
        yield GaugeMetricFamily("prefixserve_max_batch_size", "Rows the running batch holds (--max-batch-size; "
                                "reserved rows come on top)", value=e.config.max_batch_size)
        for f in fields(e.stats):  # every numeric engine counter (steps, tokens, seconds in forwards, ...)
            value = getattr(e.stats, f.name)
            if isinstance(value, (int, float)):
                yield CounterMetricFamily(f"prefixserve_engine_{f.name}", f"Engine counter {f.name}", value=value)
        finished = CounterMetricFamily("prefixserve_engine_finished", "Requests retired by the engine", labels=["reason"])
        for reason, n in dict(e.stats.finished).items():
            finished.add_metric([reason], n)
        yield finished
        yield CounterMetricFamily("prefixserve_prefix_cache_hits", "Prefix cache hits", value=c.stats.hits)
        yield CounterMetricFamily("prefixserve_prefix_cache_misses", "Prefix cache misses", value=c.stats.misses)
        yield CounterMetricFamily("prefixserve_prefix_cache_evictions", "Prefix cache evictions",
                                  value=c.stats.evictions)
        yield GaugeMetricFamily("prefixserve_prefix_cache_bytes", "Device bytes of resident prefixes",
                                value=c.bytes_used)
        yield GaugeMetricFamily("prefixserve_prefix_cache_entries", "Resident prefixes", value=len(c))

    def _tenant_queue_depths(self) -> GaugeMetricFamily:
        """Waiting requests per tenant label (bounded like every tenant label; past the bound summed as ':other').
        Empty with --scheduler fifo, whose single queue does not keep tenants apart."""
        family = GaugeMetricFamily("prefixserve_tenant_queue_depth", "Requests waiting for a batch row, per tenant",
                                   labels=["tenant"])
        if not self.engine.config.fair_scheduling:
            return family
        depths = dict.fromkeys(self._queued, 0)
        for tenant, n in self.engine.queue_depths().items():
            label = self.tenant_label(tenant or ANONYMOUS_LABEL)  # the engine's "" is the anonymous caller
            depths[label] = depths.get(label, 0) + n
        self._queued.update(depths)
        for label, n in sorted(depths.items()):
            family.add_metric([label], n)
        return family


class _TierCollector:
    """Reads the host tier's and the task map's counters at scrape time (the device tier is above)."""

    def __init__(self, tasks: TaskRegistry):
        self.tasks = tasks

    def collect(self) -> Iterator:
        d, h, t = self.tasks.tiers.device, self.tasks.tiers.host, self.tasks.stats
        lookups = CounterMetricFamily("prefixserve_prefix_tier_lookups", "Prefix lookups per tier (device, host: "
                                      "artifact caches; map: task name -> version, result absent: a tenant's own "
                                      "name known absent without a store read)", labels=["tier", "result"])
        for tier, hits, misses in (("device", d.stats.hits, d.stats.misses),
                                   ("host", h.stats.hits, h.stats.misses), ("map", t.map_hits, t.map_misses)):
            lookups.add_metric([tier, "hit"], hits)
            lookups.add_metric([tier, "miss"], misses)
        lookups.add_metric(["map", "absent"], t.absent_hits)
        yield lookups
        yield CounterMetricFamily("prefixserve_host_cache_evictions", "Host prefix cache evictions",
                                  value=h.stats.evictions)
        yield GaugeMetricFamily("prefixserve_host_cache_bytes", "Host bytes of cached prefixes (on CPU, only those not also resident on the device: each is held once)", value=h.bytes_used)
        yield GaugeMetricFamily("prefixserve_host_cache_entries", "Prefixes in the host cache", value=len(h))
        yield GaugeMetricFamily("prefixserve_task_map_entries", "Task names mapped to versions in memory",
                                value=len(self.tasks.manifests))
        yield CounterMetricFamily("prefixserve_store_events", "Store watch events applied (incl. resyncs)",
                                  value=t.events)
        yield CounterMetricFamily("prefixserve_store_resyncs", "Reconciliations with the store's snapshot",
                                  value=t.resyncs)


class Metrics:
    """Request, token and latency metrics; `render()` gives the Prometheus text format."""

    def __init__(self, engine: Engine, cache: ByteLRU, labels: MetricLabels = MetricLabels()):
        self.labels = labels
        self._tenants: set[str] = set()
        disable_created_metrics()  # no *_created series: they double the exposition for no use here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("prefixserve_requests", "Finished generation requests",
                                ["task", "tenant", "route", "finish_reason"], registry=r)
        self.errors = Counter("prefixserve_request_errors", "Requests refused or failed (tenant: '' before "
                              "authentication)", ["route", "status", "tenant"], registry=r)
        self.prompt_tokens = Counter("prefixserve_prompt_tokens", "Prompt tokens", ["task", "tenant"], registry=r)
        self.generated_tokens = Counter("prefixserve_generated_tokens", "Generated tokens", ["task", "tenant"],
                                        registry=r)
        self.ttft = Histogram("prefixserve_time_to_first_token_seconds", "Submit to first token", ["task"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("prefixserve_time_per_output_token_seconds", "Mean time between tokens after the "
                              "first, per request", ["task"], buckets=_TPOT_BUCKETS, registry=r)
        self.latency = Histogram("prefixserve_request_seconds", "Submit to last token", ["task"], registry=r)
        self.prefix_load = Histogram("prefixserve_prefix_cold_load_seconds", "Device-cache miss to a prefix on "
                                     "the device, by the tier it came from (host or store)", ["tier"],
                                     buckets=_LOAD_BUCKETS, registry=r)
        self.store_seconds = Histogram("prefixserve_store_request_seconds", "Prefix store calls by operation "
                                       "(get, get_manifest, list, put, ...), failed ones included", ["op"],
                                       buckets=_LOAD_BUCKETS, registry=r)
        self.store_errors = Counter("prefixserve_store_errors", "Prefix store calls that failed (kind: "
                                    "unavailable = the backend could not be reached, error = any other failure)",
                                    ["op", "kind"], registry=r)
        r.register(_EngineCollector(engine, cache, self.tenant))

    def add_tiers(self, tasks: TaskRegistry) -> None:
        """Export the host tier's and the task map's counters."""
        self.registry.register(_TierCollector(tasks))

    def cold_load(self, tier: str, seconds: float) -> None:
        """Record one prefix load onto the device from `tier` (host or store)."""
        self.prefix_load.labels(tier).observe(seconds)

    def tenant(self, label: str) -> str:
        """The metric label of a tenant: TENANTS unless tenants are named; then its own for the first
        `max_tenants` seen, OTHER_TENANTS after ('' before authentication and ':anonymous' stay as they are)."""
        if label in self._tenants or label in ("", ANONYMOUS_LABEL):
            return label
        if not self.labels.tenants:
            return TENANTS
        if len(self._tenants) >= self.labels.max_tenants:
            return OTHER_TENANTS
        self._tenants.add(label)
        return label

    def task(self, task: str | None, private: bool) -> str:
        """The metric label of a task: BASE_LABEL for none, PRIVATE_TASK for a tenant's own task unless private
        tasks are named, else its name."""
        if not task:
            return BASE_LABEL
        return PRIVATE_TASK if private and not self.labels.private_tasks else task

    def observe(self, task: str | None, tenant: str, route: str, finish_reason: str, prompt_tokens: int,
                generated: int, submitted_at: float, first_token_at: float | None, finished_at: float,
                private: bool = False) -> None:
        """Record one finished request (`private`: `task` is the caller's own, not a shared one)."""
        label, who = self.task(task, private), self.tenant(tenant)
        self.requests.labels(label, who, route, finish_reason).inc()
        self.prompt_tokens.labels(label, who).inc(prompt_tokens)
        self.generated_tokens.labels(label, who).inc(generated)
        self.latency.labels(label).observe(finished_at - submitted_at)
        if first_token_at is not None:
            self.ttft.labels(label).observe(first_token_at - submitted_at)
            if generated > 1:
                self.tpot.labels(label).observe((finished_at - first_token_at) / (generated - 1))

    def store_call(self, op: str, seconds: float, failure: str | None) -> None:
        """Record one prefix store call (`failure`: None, 'unavailable' or 'error')."""
        self.store_seconds.labels(op).observe(seconds)
        if failure:
            self.store_errors.labels(op, failure).inc()

    def error(self, route: str, status: int, tenant: str = "") -> None:
        """Count a refused or failed request."""
        self.errors.labels(route, str(status), self.tenant(tenant)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


TIMED_STORE_CALLS = frozenset({"put", "get", "get_manifest", "list", "list_versions", "set_version", "delete",
                               "snapshot"})


class MeteredStore:
    """A PrefixStore that times each call and counts its failures in `metrics` (a missing name or a version
    conflict is an answer, not a failure); everything else is the wrapped store's own."""

    def __init__(self, store: PrefixStore, metrics: Metrics):
        self._store, self._metrics = store, metrics
        self.url = store.url

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in TIMED_STORE_CALLS:
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0, failure = time.perf_counter(), None
            try:
                return await attr(*args, **kwargs)
            except StoreUnavailable:
                failure = "unavailable"
                raise
            except StoreError:
                failure = "error"
                raise
            finally:
                self._metrics.store_call(name, time.perf_counter() - t0, failure)
        return timed
