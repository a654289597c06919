"""prefixserve against llama.cpp's llama-server on the embedded model's own GGUF, in interleaved rounds (issue 15).

    python -m bench.peer_bench                                  # levels 1,8,32,64, 3 rounds, mixed case of 32
    python -m bench.peer_bench --levels 1,8 --rounds 1 --mixed 0   # a short run
    python -m bench.peer_bench --prefixserve-args "--max-batch-size 64"

Builds llama-server once (bench/llama_server.py, cached), starts both servers on the same GGUF (prefixserve with
its defaults plus --prefixserve-args, a fresh store holding the shipped prefixes e2e and webnlg; llama-server with
one slot per concurrent request of the largest case, continuous batching, the same threads), waits for prefixserve's
/ready and llama-server's /health, warms each up with one round, then for each concurrency level N runs `--rounds`
rounds, the two servers one after the other, the first alternating per round, the other idle. A round is N
concurrent clients each streaming one POST /v1/completions: a distinct E2E prompt of ~21 tokens, temperature 0,
32 tokens with ignore_eos (every request makes exactly 32: checked), usage in the stream. Per round: generated
tokens (usage) over the round's wall time, TTFT p50/p99 (time to the first streamed token). The mixed case: 32
requests over the shipped prefixes and bare rows on prefixserve, the same prompts bare on llama-server. After all
runs each server's VmRSS and VmHWM. Prints a table; writes bench/out/peer.json and docs/img/peer_bench.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import cpu_seconds, proc_mem
from bench.llama_server import (DEFAULT_CTX_PER_SLOT, LLAMA_CPP_PYTHON_VERSION, cpu_model, embedded_gguf,
                                llama_server_binary, server_command)
from bench.peer_workload import (SERVERS, e2e_prompts, level_jobs, mixed_jobs, round_order, round_stats, summarize,
                                 table, webnlg_prompts)
from tests.api.conftest import free_port, wait_until_up
from trainer.data import data_dir
from trainer.plots import pyplot, saved_figure

logger = logging.getLogger("bench.peer")
REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("e2e", "webnlg")


@dataclass
class Peer:
    """A running server under test."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    command: list[str]
    model: str = ""  # what a bare request sends as `model` (from GET /v1/models)
    body: dict = field(default_factory=dict)  # request fields only this server gets


async def one_request(c: httpx.AsyncClient, peer: Peer, task: str | None, prompt: str, new_tokens: int) -> dict:
    """Stream one completion; TTFT (first chunk with a choice), usage, and llama-server's cache_n when it reports it."""
    body = {"model": task if task and peer.name == "prefixserve" else peer.model, "prompt": prompt,
            "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **peer.body}
    where = f"POST {peer.url}/v1/completions"
    t0, first, usage, chunks, cached = time.perf_counter(), None, None, 0, None
    try:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{where}: HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(f"{where}: error in the stream: {obj['error']}")
                if obj.get("choices"):
                    chunks += 1
                    first = first or time.perf_counter()
                usage = obj.get("usage") or usage
                cached = (obj.get("timings") or {}).get("cache_n", cached)  # llama-server's prompt tokens from cache
    except httpx.HTTPError as e:
        raise RuntimeError(f"{where}: {type(e).__name__}: {e}") from e
    if first is None or usage is None or usage["completion_tokens"] != new_tokens:
        raise RuntimeError(f"{where}: expected {new_tokens} streamed tokens and a usage chunk, got {chunks} chunks, "
                           f"usage {usage}")
    return {"ttft_s": first - t0, "completion_tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"], "cache_n": cached}


async def run_round(peer: Peer, jobs: list[tuple[str | None, str]], new_tokens: int) -> dict:
    """All jobs at once on a fresh connection pool (one new connection per request, none reused across rounds:
    see docs/benchmarks.md on keep-alive), timed from the first send to the last response's end."""
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=peer.url, timeout=httpx.Timeout(900, connect=30), limits=limits) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(c, peer, task, p, new_tokens) for task, p in jobs))
        wall = time.perf_counter() - t0
    stats = round_stats(results, wall)
    reused = [r["cache_n"] for r in results if r["cache_n"]]
    if reused:  # llama-server started a request from another's KV: the comparison would not be like for like
        raise RuntimeError(f"{peer.url}: {len(reused)} requests reused cached prompt tokens ({reused[:5]})")
    return stats


def start_prefixserve(work: Path, extra: list[str]) -> Peer:
    """`prefixserve serve` on the embedded model with its defaults (+ extra), a fresh store under `work`."""
    port = free_port()
    cmd = [sys.executable, "-m", "prefixserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--store", str(work / "store"), *extra]
    return _start("prefixserve", cmd, port, work, "/ready")


def start_llama(work: Path, slots: int, threads: int, ctx_per_slot: int, extra: list[str]) -> Peer:
    """llama-server on the same GGUF; every request also sends cache_prompt: false."""
    port = free_port()
    cmd = server_command(llama_server_binary(), embedded_gguf(), slots, port, threads, ctx_per_slot, extra)
    peer = _start("llama-server", cmd, port, work, "/health")
    peer.body = {"cache_prompt": False}
    return peer


def _start(name: str, cmd: list[str], port: int, work: Path, ready: str) -> Peer:
    log = work / f"{name}.log"
    logger.info("starting %s: %s", name, shlex.join(cmd))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url + ready, log, name, timeout=900)
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    logger.info("%s ready at %s (pid %d, log %s)", name, url, proc.pid, log)
    return Peer(name, url, proc, log, cmd, model=models[0]["id"])


def upload_shipped(peer: Peer) -> None:
    """PUT the shipped prefixes (prefixes/e2e, prefixes/webnlg) into prefixserve's fresh store."""
    for task in SHIPPED:
        d = REPO / "prefixes" / task
        files = [("files", (f.name, f.read_bytes())) for f in sorted(d.iterdir()) if f.is_file()]
        r = httpx.put(f"{peer.url}/prefixes/{task}", files=files, timeout=120)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"PUT {peer.url}/prefixes/{task}: HTTP {r.status_code}: {r.text[:500]}")


def notable_lines(log: Path) -> list[str]:
    """llama-server's warnings and the lines that say how it runs (threads, slots, context, KV layout)."""
    keep = (" W ", " E ", "n_threads", "n_slots", "n_ctx", "system_info", "CPU_REPACK", "KV buffer")
    return [ln.strip() for ln in log.read_text(errors="replace").splitlines() if any(k in ln for k in keep)][:60]


def run_case(peers: dict[str, Peer], jobs: list[tuple[str | None, str]], rounds: int, new_tokens: int,
             pause_s: float, case: str) -> dict:
    """`rounds` interleaved rounds of one case; each server's runs and medians."""
    runs: dict[str, list[dict]] = {s: [] for s in SERVERS}
    for i in range(rounds):
        for name in round_order(i):
            time.sleep(pause_s)  # both idle before each run
            other = next(p for n, p in peers.items() if n != name)
            cpu0 = cpu_seconds(peers[name].proc.pid), cpu_seconds(other.proc.pid)
            stats = asyncio.run(run_round(peers[name], jobs, new_tokens))
            stats["server_cpu_s"] = cpu_seconds(peers[name].proc.pid) - cpu0[0]
            stats["other_server_cpu_s"] = cpu_seconds(other.proc.pid) - cpu0[1]  # ~0: the other one sat idle
            logger.info("%s round %d %s: %.1f tok/s, TTFT p50 %.3f s p99 %.3f s", case, i + 1, name,
                        stats["tokens_per_s"], stats["ttft_p50_s"], stats["ttft_p99_s"])
            runs[name].append(stats)
    return {name: summarize(r) for name, r in runs.items()}


def plot(results: dict, levels: list[int], path: Path, title: str) -> None:
    """tokens/s and TTFT p50 against concurrency, both servers (median, every run as a dot)."""
    if pyplot() is None:
        logger.info("matplotlib not installed (pip install -e .[train]): no plot")
        return
    with saved_figure(path, 1, 2, dpi=110, figsize=(11, 4.2)) as (fig, axes):
        _draw(results, levels, title, fig, axes)


def _draw(results: dict, levels: list[int], title: str, fig, axes) -> None:
    """The panels of `plot`: tokens/s and TTFT p50 against concurrency."""
    for ax, key, label in ((axes[0], "tokens_per_s", "generated tokens/s"), (axes[1], "ttft_p50_s", "TTFT p50 (s)")):
        for name, style in zip(SERVERS, ("o-", "s--")):
            cases = [results[f"c{n}"][name] for n in levels]
            ax.plot(levels, [c["median"][key] for c in cases], style, label=name)
            for n, c in zip(levels, cases):
                ax.plot([n] * len(c["runs"]), [r[key] for r in c["runs"]], ".", color="grey", alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)


def main() -> None:
    """Run both servers through every case; print the table, write the JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,8,32,64", help="concurrency levels, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mixed", type=int, default=32, help="requests in the mixed-task case (0: skip it)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama-server -t and -tb")
    ap.add_argument("--ctx-per-slot", type=int, default=DEFAULT_CTX_PER_SLOT, help="llama-server -c = slots x this")
    ap.add_argument("--prefixserve-args", default="", help="extra `prefixserve serve` arguments (one string)")
    ap.add_argument("--llama-args", default="", help="extra llama-server arguments (one string)")
    ap.add_argument("--pause-s", type=float, default=1.0, help="idle time before each run")
    ap.add_argument("--data-dir", type=Path, default=None, help="shared data (default: trainer.data.data_dir())")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "peer.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "peer_bench.png")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    levels = [int(x) for x in args.levels.split(",") if x]
    data = args.data_dir or data_dir()
    e2e = e2e_prompts(data, max(levels + [args.mixed]))
    webnlg = webnlg_prompts(data, args.mixed) if args.mixed else []
    cases = {f"c{n}": level_jobs(e2e, n) for n in levels}
    if args.mixed:
        cases[f"mixed{args.mixed}"] = mixed_jobs(e2e, webnlg, args.mixed)
    slots = max(len(j) for j in cases.values())
    llama_server_binary()  # the build (once, ~6 min on 2 cores) before any server starts
    work = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    peers: dict[str, Peer] = {}
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * len(os.sched_getaffinity(0)):
        logger.warning("load average %.1f on %d CPUs: other jobs are running. llama-server's threads wait for each "
                       "other at every operation, and with -t = the CPUs on a busy host it slows down 10x and more "
                       "(docs/benchmarks.md): these numbers will not compare the servers", load_before[0],
                       len(os.sched_getaffinity(0)))
    try:
        peers["prefixserve"] = start_prefixserve(work, shlex.split(args.prefixserve_args))
        upload_shipped(peers["prefixserve"])
        peers["llama-server"] = start_llama(work, slots, args.threads, args.ctx_per_slot,
                                            shlex.split(args.llama_args))
        for name in SERVERS:  # warm-up with the largest case, not recorded
            asyncio.run(run_round(peers[name], max(cases.values(), key=len), args.new_tokens))
        results = {case: run_case(peers, jobs, args.rounds, args.new_tokens, args.pause_s, case)
                   for case, jobs in cases.items()}
        memory = {name: proc_mem(p.proc.pid) for name, p in peers.items()}
    finally:
        for p in peers.values():
            p.proc.terminate()
            try:
                p.proc.wait(60)
            except subprocess.TimeoutExpired:
                p.proc.kill()
    cpu = cpu_model()
    report = {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M"),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "llama_server_log": notable_lines(peers["llama-server"].log) if "llama-server" in peers else [],
              "gguf": str(embedded_gguf()), "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
              "commands": {n: p.command for n, p in peers.items()}, "logs": {n: str(p.log) for n, p in peers.items()},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": results, "memory_mib": memory}
    print(f"CPU: {cpu} ({report['cpus']} CPUs)\n{table(results)}\nmemory after the runs (MiB): " +
          ", ".join(f"{n} VmRSS {m['VmRSS']:.0f} VmHWM {m['VmHWM']:.0f}" for n, m in memory.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(results, levels, args.plot, f"prefixserve vs llama-server, SmolLM2-135M Q4_1 GGUF, {args.new_tokens} new "
         f"tokens\n{cpu}, {report['cpus']} CPUs, load average {load_before[0]:.1f} at the start, {report['date']}")


if __name__ == "__main__":
    main()
