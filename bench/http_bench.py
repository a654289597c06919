"""HTTP benchmark: the same work through the real server (SSE clients) and through the engine in-process.

    python -m bench.http_bench                       # GPT-2-small-shaped random model, 64 clients, 8 tasks
    python -m bench.http_bench --clients 32 --quick  # tiny model, for a smoke run

Workload: C concurrent clients, each sending R requests back to back to /generate_stream over 8 prefix-tuned
tasks (prompts of ~24 tokens, N new tokens, greedy, EOS ignored). In-process, the same requests (same token ids,
same prefixes) go to an Engine with the same batch size, twice: from C in-process clients sending back to back
(the same arrival pattern: the ratio to this one is the cost of HTTP) and all at once (the engine's best case).
Both sides use one torch thread. Reports tokens/s of each, the ratios, p50/p99 time to first token and per-token
latency (client side, from the SSE events), and for each side what the engine did (decode steps, mean rows per
decode step, prefill forwards, milliseconds per step: from Engine.stats in-process, from /metrics over HTTP), which
says whether HTTP costs throughput through slower steps or through fuller/emptier batches. Writes
bench/out/http.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import cpu_seconds, percentile

logger = logging.getLogger("bench.http")
MODELS = {"gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024), "tiny": {}}


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Plain-English-ish prompts of ~24 GPT-2 tokens."""
    import random

    words = "the a model serves many tasks from one frozen network with prefix tuning and batching today".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(22)) for _ in range(n)]


def run_in_process(model_dir: Path, adapters: list[dict[str, bytes]], jobs: list[tuple[int, str]], new: int,
                   clients: int) -> dict[str, dict]:
    """The engine alone, two ways: `closed_loop` (C clients each submitting its next request when the previous
    ends, the arrival pattern of the HTTP run) and `all_at_once` (every request submitted together)."""
    from basemodel.convert import artifact_from_files
    from basemodel.model import load_model
    from server.engine.device_prefix import DevicePrefix
    from server.engine.engine import Engine, EngineConfig, generate_sync
    from server.engine.sampling import SamplingParams
    from server.tiers.tiers import Tiers

    import torch

    torch.set_num_threads(1)  # the same as the server process (OMP_NUM_THREADS=1 in start_server)
    loaded = load_model(str(model_dir))
    engine = Engine(loaded, EngineConfig(max_batch_size=clients, max_seq_len=1024))
    tiers = Tiers(1 << 30, 0, lambda v, a: DevicePrefix.from_artifact(v, a, loaded.device, loaded.dtype))
    arts = [artifact_from_files(a, loaded) for a in adapters]
    for a in arts:  # resident, unpinned; each request below leases its prefix once, the request gives it back
        tiers.lease(a.manifest.sha256, lambda a=a: a).release()
    versions = [a.manifest.sha256 for a in arts]
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    prompts = [loaded.tokenizer(text)["input_ids"] for _, text in jobs]
    pins = lambda idx: [tiers.lease_resident(versions[jobs[i][0]]) for i in idx]  # noqa: E731 (one a request)

    async def closed_loop() -> int:
        async def client(idx: list[int]) -> int:
            return sum([(await engine.submit(prompts[i], sp, pins([i])[0]).result()).generated_tokens for i in idx])
        return sum(await asyncio.gather(*(client(list(range(c, len(jobs), clients))) for c in range(clients))))

    def timed(run) -> dict:
        before = engine_counters(vars(engine.stats))
        t0 = time.perf_counter()
        tokens = run()
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                "engine": engine_summary(before, engine_counters(vars(engine.stats)))}

    engine.start()
    try:
        generate_sync(engine, prompts[:clients], sp, pins(range(clients)))  # warm-up
        at_once = timed(lambda: sum(r.generated_tokens for r in generate_sync(engine, prompts, sp,
                                                                               pins(range(len(jobs))))))
        looped = timed(lambda: asyncio.run(closed_loop()))
    finally:
        engine.stop()
    return {"closed_loop": looped, "all_at_once": at_once}


ENGINE_COUNTERS = ("steps", "prefill_steps", "decode_row_steps", "decode_seconds", "prefill_seconds")


def engine_counters(values: dict) -> dict[str, float]:
    """The engine counters that explain a run's throughput (from Engine.stats or /metrics)."""
    return {k: float(values[k]) for k in ENGINE_COUNTERS}


def scrape_counters(metrics_text: str) -> dict[str, float]:
    """The same counters from the server's /metrics text (prefixserve_engine_<name>_total)."""
    values = {}
    for line in metrics_text.splitlines():
        for k in ENGINE_COUNTERS:
            if line.startswith(f"prefixserve_engine_{k}_total "):
                values[k] = line.split()[-1]
    return engine_counters(values)


def engine_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the engine did during a run: decode steps, mean rows per decode step, prefill forwards, and the
    milliseconds per decode step and per prefill forward (busy time; the rest of the wall time is waiting)."""
    d = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
    return {"decode_steps": d["steps"], "mean_decode_rows": d["decode_row_steps"] / max(d["steps"], 1),
            "prefill_forwards": d["prefill_steps"], "ms_per_decode_step": 1e3 * d["decode_seconds"] / max(d["steps"], 1),
            "ms_per_prefill_forward": 1e3 * d["prefill_seconds"] / max(d["prefill_steps"], 1),
            "busy_s": d["decode_seconds"] + d["prefill_seconds"]}


async def _client(c: httpx.AsyncClient, reqs: list[tuple[int, str]], new: int, out: list[dict]) -> None:
    for task, text in reqs:
        t0 = time.perf_counter()
        stamps: list[float] = []
        body = {"inputs": text, "parameters": {"max_new_tokens": new, "ignore_eos_token": True}}
        async with c.stream("POST", "/generate_stream", params={"task": f"t{task}"}, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    stamps.append(time.perf_counter())
        out.append({"ttft": stamps[0] - t0, "tpot": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1),
                    "tokens": len(stamps)})


async def run_http(url: str, jobs: list[tuple[int, str]], clients: int, new: int, server_pid: int) -> dict:
    """C clients share the jobs round robin; wall time from the first send to the last token, and the CPU time the
    server process and these clients used meanwhile (both on the same cores)."""
    per = [jobs[i::clients] for i in range(clients)]
    out: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        # warm-up with every client at once, as the in-process side warms up with a full batch: both runs start with
        # the KV cache grown to the batch (growing it costs page faults, a one-time cost per burst: kv_cache.py)
        await asyncio.gather(*(_client(c, p[:1], new, []) for p in per))
        before = scrape_counters((await c.get("/metrics")).text)
        cpu0 = (cpu_seconds(server_pid), time.process_time())
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(c, p, new, out) for p in per))
        wall = time.perf_counter() - t0
        cpu = {"server_cpu_s": cpu_seconds(server_pid) - cpu0[0], "clients_cpu_s": time.process_time() - cpu0[1]}
        engine = engine_summary(before, scrape_counters((await c.get("/metrics")).text))
    tokens = sum(o["tokens"] for o in out)
    ttft, tpot = [o["ttft"] for o in out], [o["tpot"] for o in out]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "tpot_p50_s": statistics.median(tpot), "tpot_p99_s": percentile(tpot, 0.99), "engine": engine, **cpu}


def main() -> None:
    """Run both sides and print/write the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="tiny model instead of GPT-2-small shapes")
    ap.add_argument("--out", default="bench/out", help="a directory (writes http.json there) or a .json path")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from tests.api.conftest import peft_adapter, start_server, stop_server, upload
    from tests.tiny import save_tiny_model_dir

    shape = "tiny" if args.quick else "gpt2-small"
    work = Path(tempfile.mkdtemp(prefix="http-bench-"))
    model_dir = save_tiny_model_dir("gpt2", work / "model", seed=0, **MODELS[shape])
    adapters = [peft_adapter("gpt2", tokens=8 + 2 * i, seed=i, **MODELS[shape]) for i in range(args.tasks)]
    n = args.clients * args.requests_per_client
    jobs = [(i % args.tasks, p) for i, p in enumerate(make_prompts(n))]

    logger.info("in-process engine: %d requests, batch %d, closed loop and all at once", n, args.clients)
    engine = run_in_process(model_dir, adapters, jobs, args.new_tokens, args.clients)
    logger.info("HTTP: %d clients", args.clients)
    server = start_server(model_dir, work, max_batch_size=args.clients, max_seq_len=1024, log_level="warning")
    try:
        with server.client() as c:
            for i, a in enumerate(adapters):
                assert upload(c, f"t{i}", a).status_code in (200, 201)
        http = asyncio.run(run_http(server.url, jobs, args.clients, args.new_tokens, server.proc.pid))
    finally:
        stop_server(server)
    result = {"model": shape, "clients": args.clients, "requests": n, "tasks": args.tasks,
              "new_tokens": args.new_tokens, "engine": engine, "http": http,
              "ratio": http["tokens_per_s"] / engine["closed_loop"]["tokens_per_s"],
              "ratio_vs_all_at_once": http["tokens_per_s"] / engine["all_at_once"]["tokens_per_s"]}
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out = out if out.suffix == ".json" else out / "http.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
