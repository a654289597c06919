"""Fairness benchmark (issue 7): a light tenant's latency while another tenant floods the real server.

    python -m bench.fairness_bench            # GPT-2-small-shaped random model, batch 8, 300 flood requests
    python -m bench.fairness_bench --quick    # tiny model, fewer requests (a smoke run)

Two tenants with API keys on one server. The light tenant sends one streamed request at a time (N new tokens,
EOS ignored) and we record its latency (TTFT, time per output token, total). First alone (unloaded), then while
the flooder keeps `--flood` requests in flight (M new tokens each, resubmitted as they finish; its
concurrent_requests quota is `--flood-cap`, so the rest get 429 and retry after Retry-After). The flooder runs in a
process of its own, as another tenant's client would. Each configuration runs on a fresh server:

- fifo      : --scheduler fifo, flood cap `--flood-cap` (hundreds queued): the baseline (only `--fifo-light`
              light requests: each waits for the whole flood queue);
- fair      : --scheduler fair (virtual token counter), same cap;
- fair+cap  : fair, and the flooder capped below the batch size (`--batch / 2` requests in flight);
- fair+reserve: fair, the fair config's cap, and one reserved row (--scheduler-reserved-rows 1: a row beyond the
              batch that only a tenant holding no row may take, so the light tenant's request finds a row at once).

Prints, per configuration, the light tenant's p50/p99 latency loaded vs unloaded and their ratio, the flooder's
completed requests and 429s; writes bench/out/fairness.json and, with matplotlib, bench/out/fairness.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import percentile
from bench.http_bench import MODELS, make_prompts
from trainer.plots import pyplot, saved_figure

logger = logging.getLogger("bench.fairness")
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> str:
    """Run `prefixserve ARGS`; its stdout (raises with stderr on failure)."""
    done = subprocess.run([sys.executable, "-m", "prefixserve.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    if done.returncode:
        raise RuntimeError(f"prefixserve {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


def make_tenants(store: Path, flood_cap: int) -> dict[str, str]:
    """API keys of the two tenants (their creation turns auth on) and the flooder's concurrency quota."""
    keys = {t: cli("keys", "create", "--tenant", t, "--store", str(store)).strip().splitlines()[-1]
            for t in ("flood", "light")}
    cli("tenants", "set", "flood", "--limit", f"concurrent_requests={flood_cap}", "--store", str(store))
    return keys


async def light_request(c: httpx.AsyncClient, key: str, prompt: str, new: int) -> dict[str, float]:
    """One streamed request: seconds to the first token, per later token, and in all."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new, "ignore_eos_token": True}}
    t0 = time.perf_counter()
    first, n = None, 0
    async with c.stream("POST", "/generate_stream", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                if '"error"' in line:
                    raise RuntimeError(line)
                n += 1
                first = first or time.perf_counter()
    total = time.perf_counter() - t0
    assert n == new and first is not None, (n, new)
    return {"ttft": first - t0, "tpot": (t0 + total - first) / max(1, n - 1), "total": total}


async def light_series(url: str, key: str, prompts: list[str], new: int) -> list[dict[str, float]]:
    """The light tenant: one request at a time (a dropped keep-alive connection is retried once, and counted)."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        for p in prompts:
            try:
                out.append(await light_request(c, key, p, new))
            except httpx.TransportError as e:
                logger.warning("light request: %r; retried on a new connection", e)
                out.append({**await light_request(c, key, p, new), "retried": 1.0})
    return out


async def flooder(url: str, key: str, inflight: int, new: int, stop: asyncio.Event, stats: dict[str, int]) -> None:
    """`inflight` workers, each re-sending a request as soon as its last one finished (or 1 s after a 429)."""
    body = {"inputs": "flood " * 8, "parameters": {"max_new_tokens": new, "ignore_eos_token": True}}
    limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=inflight)

    async def worker(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await c.post("/generate", json=body, headers={"Authorization": f"Bearer {key}"})
            kind = "ok" if r.status_code == 200 else str(r.status_code)
            stats[kind] = stats.get(kind, 0) + 1
            if r.status_code != 200:
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        workers = [asyncio.ensure_future(worker(c)) for _ in range(inflight)]
        await stop.wait()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def flood_process(url: str, key: str, inflight: int, new: int, stop, out) -> None:
    """The flooder in a process of its own (its own event loop and core time, as another tenant's client would
    be): runs until `stop` (a multiprocessing Event) is set, then puts its counts on `out`."""
    async def run() -> None:
        done, stats = asyncio.Event(), {}
        flood = asyncio.ensure_future(flooder(url, key, inflight, new, done, stats))
        while not stop.is_set():
            await asyncio.sleep(0.1)
        done.set()
        await flood
        out.put(stats)
    asyncio.run(run())


async def gauge(url: str, name: str) -> float:
    """An unlabelled gauge from /metrics (prefixserve_queue_depth, prefixserve_batch_size)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        for line in (await c.get("/metrics")).text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0


async def queue_depth(url: str) -> float:
    """prefixserve_queue_depth from /metrics."""
    return await gauge(url, "prefixserve_queue_depth")


async def loaded_series(url: str, keys: dict[str, str], prompts: list[str], args, flood_cap: int) -> dict:
    """The light series while the flooder runs in its own process (it starts first and fills the queue up to its
    quota). In one event loop with the flood's hundreds of connections, the light client's own requests would wait
    behind them in the benchmark's client: that is not the server's latency."""
    ctx = multiprocessing.get_context("spawn")
    stop, counts = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=flood_process, args=(url, keys["flood"], args.flood, args.flood_new, stop, counts),
                       daemon=True)
    proc.start()
    want = min(flood_cap, args.flood) - args.batch  # queued once the flooder holds its quota
    rows = min(flood_cap, args.flood, args.batch)  # rows the flood holds once it runs
    deadline = time.monotonic() + 120
    while (await queue_depth(url) < want * 0.9 or await gauge(url, "prefixserve_batch_size") < rows) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    depth = await queue_depth(url)
    light = await light_series(url, keys["light"], prompts, args.new)
    depth_after = await queue_depth(url)
    stop.set()
    stats = await asyncio.to_thread(counts.get, True, 300)
    proc.join(60)
    return {"light": light, "flood": stats, "queue_depth_at_start": depth, "queue_depth_at_end": depth_after}


def summary(xs: list[dict[str, float]]) -> dict[str, float]:
    """p50/p99 of total latency, TTFT and time per output token."""
    out = {}
    for k in ("total", "ttft", "tpot"):
        vals = sorted(x[k] for x in xs)
        out[f"{k}_p50_s"], out[f"{k}_p99_s"] = percentile(vals, 0.5), percentile(vals, 0.99)
    return out


def run_config(name: str, model_dir: Path, work: Path, args, scheduler: str, flood_cap: int,
               reserved: int = 0) -> dict:
    """One fresh server: unloaded light series, then loaded."""
    from tests.api.conftest import start_server, stop_server

    d = work / name
    d.mkdir()
    keys = make_tenants(d / "store", flood_cap)
    server = start_server(model_dir, d, max_batch_size=args.batch, max_seq_len=512, max_queue=1024,
                          scheduler=scheduler, scheduler_reserved_rows=reserved, request_timeout_s=3600,
                          log_level="warning")
    prompts = make_prompts(args.fifo_light if scheduler == "fifo" else args.light, seed=1)
    try:
        asyncio.run(light_series(server.url, keys["light"], prompts[:2], args.new))  # warm-up
        alone = asyncio.run(light_series(server.url, keys["light"], prompts, args.new))
        loaded = asyncio.run(loaded_series(server.url, keys, prompts, args, flood_cap))
    finally:
        stop_server(server)
    a, b = summary(alone), summary(loaded["light"])
    result = {"scheduler": scheduler, "flood_cap": flood_cap, "reserved_rows": reserved, "unloaded": a, "loaded": b,
              "p50_ratio": b["total_p50_s"] / a["total_p50_s"], "p99_ratio": b["total_p99_s"] / a["total_p99_s"],
              "tpot_ratio": b["tpot_p50_s"] / a["tpot_p50_s"], "flood": loaded["flood"],
              "queue_depth_at_start": loaded["queue_depth_at_start"],
              "queue_depth_at_end": loaded["queue_depth_at_end"],
              "light_retries": sum(x.get("retried", 0) for x in alone + loaded["light"]),
              "light_unloaded_s": [x["total"] for x in alone], "light_loaded_s": [x["total"] for x in loaded["light"]]}
    logger.info("%s: p50 %.3f -> %.3f s, p99 %.3f -> %.3f s (x%.2f), flood %s", name, a["total_p50_s"],
                b["total_p50_s"], a["total_p99_s"], b["total_p99_s"], result["p99_ratio"], loaded["flood"])
    return result


def plot(results: dict[str, dict], path: Path) -> None:
    """Light-tenant latency per request, unloaded and loaded, one panel per configuration."""
    if pyplot() is None:
        logger.info("matplotlib not installed (pip install -e .[train]): no plot")
        return
    with saved_figure(path, 1, len(results), dpi=110, figsize=(4 * len(results), 3), sharey=True,
                      squeeze=False) as (_, axes):
        axes = axes[0]
        for ax, (name, r) in zip(axes, results.items()):
            ax.plot(r["light_unloaded_s"], "o-", ms=3, label="unloaded")
            ax.plot(r["light_loaded_s"], "o-", ms=3, label="flooded")
            ax.set_title(f"{name}: p99 x{r['p99_ratio']:.2f}")
            ax.set_xlabel("light request #")
        axes[0].set_ylabel("latency (s)")
        axes[0].legend()


def main() -> None:
    """Run the configurations and print/write the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="max_batch_size")
    ap.add_argument("--flood", type=int, default=300, help="flood requests kept in flight")
    ap.add_argument("--flood-cap", type=int, default=256, help="the flooder's concurrent_requests quota")
    ap.add_argument("--flood-new", type=int, default=64, help="new tokens per flood request")
    ap.add_argument("--light", type=int, default=40, help="light requests per series")
    ap.add_argument("--fifo-light", type=int, default=3, help="light requests under fifo (each waits for the "
                                                                "whole flood queue)")
    ap.add_argument("--new", type=int, default=32, help="new tokens per light request")
    ap.add_argument("--quick", action="store_true", help="tiny model")
    ap.add_argument("--only", default="", help="comma-separated subset of fifo,fair,fair+cap,fair+reserve")
    ap.add_argument("--out", default="bench/out", help="output directory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from tests.tiny import save_tiny_model_dir

    shape = "tiny" if args.quick else "gpt2-small"
    work = Path(tempfile.mkdtemp(prefix="fairness-bench-"))
    model_dir = save_tiny_model_dir("gpt2", work / "model", seed=0, **MODELS[shape])
    configs = {"fifo": ("fifo", args.flood_cap), "fair": ("fair", args.flood_cap),
               "fair+cap": ("fair", max(1, args.batch // 2)), "fair+reserve": ("fair", args.flood_cap, 1)}
    chosen = [c for c in (args.only.split(",") if args.only else configs)]
    results = {name: run_config(name.replace("+", "_"), model_dir, work, args, *configs[name]) for name in chosen}
    report = {"model": shape, "batch": args.batch, "flood": args.flood, "flood_new": args.flood_new,
              "light": args.light, "new": args.new, "configs": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fairness.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "fairness.png")
    print(f"{'config':10} {'cap':>5} {'p50 alone':>10} {'p50 flood':>10} {'p99 alone':>10} {'p99 flood':>10} "
          f"{'p99 x':>6} {'tpot x':>7} {'flood ok':>9} {'429s':>6}")
    for name, r in results.items():
        u, lo = r["unloaded"], r["loaded"]
        print(f"{name:10} {r['flood_cap']:5d} {u['total_p50_s']:10.3f} {lo['total_p50_s']:10.3f} "
              f"{u['total_p99_s']:10.3f} {lo['total_p99_s']:10.3f} {r['p99_ratio']:6.2f} {r['tpot_ratio']:7.2f} "
              f"{r['flood'].get('ok', 0):9d} {r['flood'].get('429', 0):6d}")


if __name__ == "__main__":
    main()
