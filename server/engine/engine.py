"""The engine: one thread owns the model and runs schedule -> execute -> update, one decode step at a time.

Requests of any mix of tasks join the running batch between steps (after a prefill forward that places their
prefix and prompt in their cache row) and leave it as soon as they finish; each row carries its own prefix.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from basemodel.model import LoadedModel
from server.engine.batch import Row, RunningBatch
from server.engine.config import EngineConfig
from server.engine.device_prefix import DevicePrefix
from server.engine.jobs import ModelJobs
from server.engine.lora import DeviceLora
from server.engine.packed import give_back_memory
from server.engine.runner import make_runner
from server.engine.request import (EngineOverloaded, EngineStopped, GenerationResult, Outbox, Request,
                                   RequestHandle, TaskLease, TokenEvent, Unheld, finish_reason)
from server.engine.sampling import Choice, RowSampler, SamplingParams, choose_tokens
from server.engine.scheduler import FairQueue

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class EngineStats:
    """Counters for /metrics and benchmarks."""

    steps: int = 0
    prefill_steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0  # time in prefill forwards
    decode_seconds: float = 0.0  # time in decode forwards
    decode_row_steps: int = 0  # sum over decode steps of the rows in the batch
    finished: dict[str, int] = field(default_factory=dict)
    isolated_failures: int = 0  # rows failed alone by a step that went on for their batch-mates
    jobs: int = 0  # model jobs run between steps (run_exclusive: jobs.py)
    job_seconds: float = 0.0  # time in them


class Engine:
    """Continuous batching over one frozen model; see the module docstring."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.loaded, self.model, self.spec = loaded, loaded.model, loaded.spec
        self.config = config or EngineConfig()
        self.max_seq_len = min(self.config.max_seq_len, self.spec.max_positions)
        if not 0 <= self.config.reserved_rows <= self.config.max_batch_size:
            raise ValueError(f"reserved_rows must be in [0, max_batch_size], got {self.config.reserved_rows}")
        self.device = loaded.device
        eos = set(self.config.eos_token_ids)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_token_ids = frozenset(eos)
        # the engine thread writes into the buffers made here, so they must be normal tensors even when the caller
        # builds the engine under torch.inference_mode() (the quantised runner's cache would refuse the writes)
        with torch.inference_mode(False):
            self.runner = make_runner(loaded, self.config, self.max_seq_len)  # what differs per model kind
        # why LoRA rows cannot be served here (None: they can): a runner serves them if it has LoRA layers
        self.lora_refusal = None if getattr(self.runner, "lora_layers", None) is not None else (
            getattr(self.runner, "lora_refusal", None) or
            f"this server's model runner ({type(self.runner).__name__}, {self.spec.model_type}) does not serve "
            "LoRA adapters")
        self.cache = self.runner.cache
        self.batch = RunningBatch(self.cache)
        self._admitting: list[RequestHandle] = []  # taken from the queue, not yet running (prefill in progress)
        self._outbox = Outbox()  # this step's events, delivered once per step
        self._pending = FairQueue(self.config.prompt_token_weight, self.config.output_token_weight,
                                  fifo=not self.config.fair_scheduling)  # waiting requests (scheduler.py)
        self._next_sweep = 0.0  # when the queue is next searched for cancelled or expired requests
        self._jobs = ModelJobs()  # model work other than requests, run between steps (jobs.py)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: str | None = None  # why the engine thread died (None while it runs or after a clean stop)
        self.stats = EngineStats()

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="prefixserve-engine", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        """True while the engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def dead(self) -> bool:
        """True once the engine thread has died of an error it could not confine to rows (see `failure`)."""
        return self.failure is not None

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything queued or running (at the next step), then stop the thread; model jobs not run by
        then fail with EngineStopped."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:
            jobs = self._jobs.take()
        ModelJobs.fail(jobs, EngineStopped("the engine is shutting down"))

    def run_exclusive(self, work: Callable[[], T]) -> Future[T]:
        """Run `work`, anything that uses the model besides serving (prompt-tuning conversion, a warm-up, an
        evaluation), on the engine's thread between two steps; its future gets the result or the exception
        (jobs.py). Raises EngineStopped once the engine is stopping or has failed."""
        with self._cv:
            if self._stopping or self.failure is not None:
                raise EngineStopped("the engine is shutting down" if self.failure is None
                                    else f"the engine has failed ({self.failure})")
            fut = self._jobs.add(work)
            self._cv.notify()
        return fut

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""
        return len(self._pending)

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting to be admitted, per tenant (tenants with none waiting are absent)."""
        with self._cv:
            return self._pending.depths()

    @property
    def batch_size(self) -> int:
        """Rows in the running batch (decoding or still prefilling)."""
        return len(self.batch)

    @property
    def rows(self) -> list[Row]:
        """The decoding rows, in cache-row order."""
        return self.batch.decoding

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               task: TaskLease | DevicePrefix | DeviceLora | None = None,
               tag: str = "", loop: asyncio.AbstractEventLoop | None = None, tenant: str = "",
               weight: float = 1.0, timeout_s: float | None = None) -> RequestHandle:
        """Queue a request for `tenant` (share `weight`, see scheduler.py). `task`: the lease on its task's payload
        (server/tiers), given back when the request ends, however it ends (a bare DevicePrefix or DeviceLora: a
        payload nothing holds, for tests and benchmarks); if submit raises, the caller keeps it. A LoRA task is
        refused (ValueError) where the runner does not serve LoRA rows (`lora_refusal`).

        `timeout_s` (default: the config's request_timeout_s) bounds queueing plus generation: past it the request
        ends with finish_reason 'timeout'. Raises ValueError for invalid settings, EngineOverloaded when the queue
        is full, EngineStopped.
        """
        params.validate()
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        task = Unheld(task) if isinstance(task, (DevicePrefix, DeviceLora)) else task
        payload = task.payload if task is not None else None
        if isinstance(payload, DeviceLora):
            if self.lora_refusal is not None:
                raise ValueError(f"task: {self.lora_refusal}")
            try:
                self.runner.lora_layers.check(payload)  # before queueing: a refusal is the client's 422
            except ValueError as e:
                raise ValueError(f"task: {e}") from None
        self.runner.check(prompt_ids, payload if isinstance(payload, DevicePrefix) else None, params.max_new_tokens)
        if any(not 0 <= t < self.spec.vocab_size for t in prompt_ids):
            raise ValueError(f"token ids must be in [0, {self.spec.vocab_size})")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        request = Request(list(prompt_ids), params, task, tag, tenant, weight, timeout_s,
                          decoder_ids=self.runner.decoder_prompt(prompt_ids))
        handle = RequestHandle(request, loop)
        with self._cv:
            if self._stopping or self.failure is not None:
                raise EngineStopped("the engine is shutting down" if self.failure is None
                                    else f"the engine has failed ({self.failure})")
            if len(self._pending) >= self.config.max_queue:
                raise EngineOverloaded(f"the request queue is full ({self.config.max_queue} waiting)")
            self._pending.push(handle)
            self._cv.notify()
        return handle

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._pending and not len(self.batch) and not self._jobs and not self._stopping:
                        # idle for idle_release_s: give the memory of the last burst back (a burst that comes
                        # sooner reuses the buffers instead of growing them again)
                        if not self._cv.wait(timeout=self.config.idle_release_s):
                            self.release_idle_memory()
                    if self._stopping and not self._pending and not len(self.batch):
                        ModelJobs.fail(self._jobs.take(), EngineStopped("the engine is shutting down"))
                        return
                self.step()
        except BaseException as e:  # what a step could not confine to rows: the engine's state is unknown
            self._die(f"{type(e).__name__}: {e}")

    def _die(self, error: str) -> None:
        """Fail every running and queued request and let the thread end; `dead` turns true (the server's /ready
        then fails and it exits non-zero, so an orchestrator restarts it)."""
        logger.critical("engine thread failed, every request ends with an error: %s", error, exc_info=True)
        with self._cv:
            self.failure = error
            jobs = self._jobs.take()
        ModelJobs.fail(jobs, EngineStopped(f"the engine has failed ({error})"))
        try:
            self._fail_all(f"the engine failed: {error}")
        finally:
            self._outbox.flush()

    def step(self) -> None:
        """One iteration: retire cancelled rows, admit, prefill a chunk of prompts, one decode step for the rest.

        The step's token events and results reach their event loops together at the end of the step.
        """
        try:
            self._step()
        finally:
            self._outbox.flush()

    def _step(self) -> None:
        self._run_jobs()
        if self._stopping:  # shutting down: everything still here ends as cancelled
            for r in self.batch.all_rows():
                r.request.cancelled = True
            with self._cv:
                for h in self._pending:
                    h.request.cancelled = True
        now = time.monotonic()
        self._retire([r for r in self.batch.all_rows() if r.request.cancelled], "cancelled")
        self._retire([r for r in self.batch.all_rows() if r.request.expired(now)], "timeout")
        self._sweep_queue(now)
        self._admitting = self._admit()
        if self._admitting:
            self._place(self._admitting)
        self._admitting = []
        if self.batch.prefilling:
            self._prefill_chunk()
        if self.batch.decoding:
            self._decode()

    def _run_jobs(self) -> None:
        """Run the model jobs queued since the last step (none beside a forward: this is the engine's thread)."""
        with self._cv:
            jobs = self._jobs.take() if self._jobs else []
        if self._stopping:
            ModelJobs.fail(jobs, EngineStopped("the engine is shutting down"))
        elif jobs:
            ran, seconds = ModelJobs.run(jobs)
            self.stats.jobs += ran
            self.stats.job_seconds += seconds

    def _place(self, handles: list[RequestHandle]) -> None:
        """Set admitted requests up as rows (seq2seq: their encoder pass) and place them in the prefill block; if
        that fails, each is placed alone and only the ones that fail again end with an error."""
        try:
            self._place_rows(handles)
        except Exception:
            for h in handles:
                try:
                    self._place_rows([h])
                except Exception as e:
                    logger.exception("admitting request %d failed", h.request.id)
                    self.stats.isolated_failures += 1
                    self._finish_unstarted(h, "error", f"{type(e).__name__}: {e}")

    def _place_rows(self, handles: list[RequestHandle]) -> None:
        rows = [Row(h, RowSampler.create(h.request.params, h.request.decoder_prompt, self.device,
                                         self.eos_token_ids),
                    length=h.request.prefix.length if h.request.prefix else 0) for h in handles]
        self.runner.admit(rows)  # per-row set-up (seq2seq: the encoder, once per request)
        self.batch.add(rows)  # all placed, or none

    def _forward_isolated(self, rows: list[Row], row_start: int, ids: torch.Tensor, write_pos: torch.Tensor,
                          kv_len: Callable[[list[Row]], int], retry: bool = False,
                          ) -> tuple[list[Row], torch.Tensor, list[tuple[Row, str]]]:
        """Forward a contiguous block of rows; if it raises, forward each half on its own (a single row once more),
        so only a row whose own forward fails again is failed. Returns (rows that ran, their logits [n, V] in that
        order, [(failed row, error)]). Rows do not depend on their batch-mates, so a half computes what it would
        have in the whole block; positions a failed forward wrote are written again by the retry."""
        try:
            return rows, self.runner.forward(ids, write_pos, row_start, kv_len(rows)), []
        except Exception as e:
            if len(rows) == 1 and retry:
                logger.exception("forward failed twice for request %d", rows[0].request.id)
                return [], ids.new_zeros((0, 0), dtype=torch.float32), [(rows[0], f"{type(e).__name__}: {e}")]
            logger.warning("forward of %d rows failed (%s: %s): retrying in halves", len(rows), type(e).__name__, e)
        if len(rows) == 1:
            return self._forward_isolated(rows, row_start, ids, write_pos, kv_len, retry=True)
        m = len(rows) // 2
        a = self._forward_isolated(rows[:m], row_start, ids[:m], write_pos[:m], kv_len, retry=True)
        b = self._forward_isolated(rows[m:], row_start + m, ids[m:], write_pos[m:], kv_len, retry=True)
        parts = [x for x in (a[1], b[1]) if x.numel()]
        return a[0] + b[0], torch.cat(parts) if parts else a[1], a[2] + b[2]

    def _fail_rows(self, failed: list[tuple[Row, str]]) -> None:
        """End rows that failed alone (each with its own error); their batch-mates go on."""
        for row, error in failed:
            self.stats.isolated_failures += 1
            self._retire([row], "error", error)

    def release_idle_memory(self) -> None:
        """Shrink the KV buffers back to their initial size if nothing is running or queued, and hand the freed heap
        back to the OS (glibc keeps freed pages as the process's own otherwise)."""
        if not len(self.batch) and not self._pending:
            before = self.cache.nbytes()
            self.cache.shrink()
            if self.cache.nbytes() < before:  # once per burst, not every idle period (a trim costs ~0.1-0.3 s)
                give_back_memory()

    def _sweep_queue(self, now: float) -> None:
        """A few times a second, end waiting requests that were cancelled or ran out of time (they hold no row)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 0.25
        with self._cv:
            gone = self._pending.remove_if(lambda h: h.request.cancelled or h.request.expired(now))
        for h in gone:
            self._finish_unstarted(h, "cancelled" if h.request.cancelled else "timeout")

    def _admit(self) -> list[RequestHandle]:
        """Take queued requests, fairly between tenants (scheduler.py), while rows and the KV-cache budget allow.

        The budget is checked against what the cache will hold once the rows are placed (`runner.planned_bytes`:
        for an encoder-decoder model, also the cross slots the admitted inputs need). With nothing running a
        request is admitted anyway (submit checked that it fits alone); buffers kept from an earlier burst that
        would take it past the budget go back to their initial size first.
        """
        admitted: list[RequestHandle] = []
        longest, now = self.batch.longest(), time.monotonic()
        capped: set[str] = set()  # tenants that hold a row, once only reserved rows are left
        with self._cv:
            held = self._rows_per_tenant() if self._reserving else None
            while self._pending and len(self.batch) + len(admitted) < self.config.row_capacity:
                h = self._pending.peek(capped)
                if h is None:
                    break  # only tenants that hold a row wait: the reserved rows are for the others
                if h.request.cancelled or h.request.expired(now):
                    self._pending.pop(charge=False, exclude=capped)
                    self._finish_unstarted(h, "cancelled" if h.request.cancelled else "timeout")
                    continue
                tenant = self._pending.tenant_of(h)
                if held is not None and len(self.batch) + len(admitted) >= self.config.max_batch_size \
                        and held.get(tenant, 0):
                    capped.add(tenant)  # a reserved row is only for a tenant that holds none
                    continue
                want = max(longest, h.request.final_length)
                rows = len(self.batch) + len(admitted) + 1
                need = self.runner.planned_bytes(rows, want, [a.request for a in admitted] + [h.request])
                if need > self.config.kv_cache_bytes:
                    if rows > 1:
                        break  # wait for running rows to finish rather than exceed the KV budget
                    self.cache.shrink()  # nothing runs: the last burst's buffers must not push this one past it
                longest = want
                admitted.append(self._pending.pop(exclude=capped))
                if held is not None:
                    held[tenant] = held.get(tenant, 0) + 1
        return admitted

    @property
    def _reserving(self) -> bool:
        return self.config.reserved_rows > 0 and self.config.fair_scheduling

    def _rows_per_tenant(self) -> dict[str, int]:
        return dict(Counter(r.request.tenant for r in self.batch.all_rows()))

    def _finish_unstarted(self, h: RequestHandle, reason: str, error: str | None = None) -> None:
        r = h.request
        now = time.monotonic()
        h._finish(GenerationResult([], [], reason, len(r.prompt_ids), r.params.seed,
                                   r.task.version if r.task else None, r.submitted_at, None, now, error),
                  self._outbox)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    # ------------------------------------------------------------------ execute
    def _prefill_chunk(self) -> None:
        """Feed prefilling rows up to max_prefill_tokens prompt tokens, in block order; promote rows that are done.

        Rows get their chunks in block order, so the rows with work this step are a leading run of the prefill
        block and the forward covers only them (rows left for the next step cost nothing now).
        """
        rows, chunks, budget = [], [], self.config.max_prefill_tokens
        for r in self.batch.prefilling:
            if budget <= 0:
                break
            rows.append(r)
            chunks.append(min(r.prompt_left, budget))
            budget -= chunks[-1]
        width = max(chunks)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        wpos = torch.full((len(rows), width), self.cache.trash_pos, dtype=torch.long)
        for i, (r, c) in enumerate(zip(rows, chunks)):
            r.chunk = c
            # left padding: every row's last token of this chunk sits in the last column
            ids[i, width - c:] = torch.tensor(r.request.decoder_prompt[r.prompt_done:r.prompt_done + c])
            wpos[i, width - c:] = torch.arange(r.length, r.length + c)
        t0 = time.perf_counter()
        ran, logits, failed = self._forward_isolated(rows, len(self.batch.decoding), ids.to(self.device),
                                                     wpos.to(self.device), _prefill_kv_len)
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(chunks)
        for r in ran:
            r.length += r.chunk
            r.prompt_done += r.chunk
        done = [i for i, r in enumerate(ran) if not r.prompt_left]
        for i in done:
            self.batch.promote(ran[i])
        if done:
            self._update([ran[i] for i in done], self.runner.first_token_logits(logits[done]))
        self._fail_rows(failed)

    def _decode(self) -> None:
        rows = list(self.batch.decoding)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        wpos = torch.tensor([[r.length] for r in rows], device=self.device)
        t0 = time.perf_counter()
        ran, logits, failed = self._forward_isolated(rows, 0, ids, wpos, _decode_kv_len)
        for r in ran:
            r.length += 1
        self.stats.steps += 1
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_row_steps += len(rows)
        self._update(ran, logits)
        self._fail_rows(failed)

    # ------------------------------------------------------------------ update
    def _update(self, rows: list[Row], logits: torch.Tensor) -> None:
        if not rows:
            return
        try:
            choices = choose_tokens(logits, [r.sampler for r in rows])
        except Exception:  # not one row's failure (choose_tokens confines those): choose row by row instead
            logger.exception("choosing tokens for %d rows failed; choosing row by row", len(rows))
            choices = [self._choose_alone(logits[i:i + 1], r) for i, r in enumerate(rows)]
        now = time.monotonic()
        done: dict[str, list[Row]] = {}
        failed: list[tuple[Row, str]] = []
        for r, c in zip(rows, choices):
            if r.request.cancelled:
                done.setdefault("cancelled", []).append(r)
                continue
            if c.error is not None:
                failed.append((r, c.error))
                continue
            t = c.token
            r.tokens.append(t)
            r.logprobs.append(c.logprob)
            if r.first_token_at is None:
                r.first_token_at = now
            reason = finish_reason(t, len(r.tokens), r.request.params, self.eos_token_ids)
            r.handle._emit(TokenEvent(t, c.logprob, len(r.tokens) - 1, c.top, reason), self._outbox)
            if reason is not None:
                done.setdefault(reason, []).append(r)
        served = Counter(r.request.tenant for r, c in zip(rows, choices) if not r.request.cancelled and not c.error)
        self.stats.generated_tokens += sum(served.values())
        with self._cv:
            for tenant, n in served.items():
                self._pending.charge(tenant, output_tokens=n)
        for reason, finished in done.items():
            self._retire(finished, reason)
        self._fail_rows(failed)

    @staticmethod
    def _choose_alone(logits: torch.Tensor, row: Row) -> Choice:
        try:
            return choose_tokens(logits, [row.sampler])[0]
        except Exception as e:
            return Choice(error=f"{type(e).__name__}: {e}")

    def _retire(self, rows: list[Row], reason: str, error: str | None = None) -> None:
        """Finish rows and free their cache rows (each request gives its task's lease back as it finishes)."""
        now = time.monotonic()
        for r in rows:
            self.batch.remove(r)
            req = r.request
            r.handle._finish(GenerationResult(r.tokens, r.logprobs, reason, len(req.prompt_ids), req.params.seed,
                                              req.task.version if req.task else None, req.submitted_at,
                                              r.first_token_at, now, error), self._outbox)
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _fail_all(self, error: str) -> None:
        running = {id(r.handle) for r in self.batch.all_rows()}
        self._retire(self.batch.all_rows(), "error", error)
        for h in self._admitting:  # failed during their prefill, before they became rows
            if id(h) not in running and not h.done:
                self._finish_unstarted(h, "error", error)
        self._admitting = []
        with self._cv:
            pending = self._pending.drain()
        for h in pending:
            self._finish_unstarted(h, "error", error)


def _prefill_kv_len(rows: list[Row]) -> int:
    """Cache positions a prefill chunk attends to: up to the end of its longest row's chunk."""
    return max(r.length + r.chunk for r in rows)


def _decode_kv_len(rows: list[Row]) -> int:
    """Cache positions a decode step attends to: every row's filled positions and the one it writes."""
    return max(r.length for r in rows) + 1


def generate_sync(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                  prefixes: list[TaskLease | DevicePrefix | DeviceLora | None] | None = None,
                  timeout: float | None = 600) -> list[GenerationResult]:
    """Submit many requests to a started engine from a plain thread and wait for all (tests, benchmarks)."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    pre = prefixes or [None] * len(prompts)
    handles = [engine.submit(p, sp, px, loop=None) for p, sp, px in zip(prompts, plist, pre)]
    return [h.wait(timeout) for h in handles]
