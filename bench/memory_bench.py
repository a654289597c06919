"""Memory with many tenants: the real server on the embedded model, 1,000 registered tasks, 100 of them resident.

    python -m bench.memory_bench [--tasks 1000] [--resident 100] [--prefix-length 10]

Starts `prefixserve serve` (embedded SmolLM2-135M), serves R concurrent requests without a task (this allocates
the KV buffers that R concurrent rows need), uploads N prefix artifacts over HTTP, serves one request for each of
R distinct tasks with the device prefix cache sized for R prefixes, then 2R more tasks (evictions), reading the
server's resident memory (VmRSS) and peak (VmHWM) from /proc at each phase. What the tasks cost is the peak after
all that minus the peak after the task-less batch. Writes bench/out/memory.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from tqdm import tqdm
from transformers import AutoConfig

from basemodel.model import embedded_model_dir, spec_from_config
from bench.common import proc_mem
from prefix_store.artifact import build_artifact


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll /ready until the server answers 200."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


async def generate_many(url: str, tasks: list[str]) -> list[int]:
    """One short greedy request per task, all at once; return the status codes."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        rs = await asyncio.gather(*[c.post("/generate", params={"task": t},
                                           json={"inputs": "name : The Eagle | Type : coffee shop",
                                                 "parameters": {"max_new_tokens": 4}}) for t in tasks])
    return [r.status_code for r in rs]


def main(argv: list[str] | None = None) -> int:
    """Run the phases and print/write the memory report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--resident", type=int, default=100)
    ap.add_argument("--prefix-length", type=int, default=10)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    spec = spec_from_config(AutoConfig.from_pretrained(embedded_model_dir()))
    per_prefix = spec.num_layers * 2 * spec.kv_dim * args.prefix_length * 4
    report: dict = {"tasks": args.tasks, "resident": args.resident, "prefix_length": args.prefix_length,
                    "prefix_bytes": per_prefix}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"http://127.0.0.1:{args.port}"
        cmd = [sys.executable, "-m", "prefixserve.cli", "serve", "--model", "embedded", "--store", f"{tmp}/store",
               "--port", str(args.port), "--prefix-cache-bytes", str(per_prefix * args.resident),
               "--max-batch-size", "64"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url, proc)
            report["after_start"] = proc_mem(proc.pid)
            # the same concurrency with no task: allocates the KV buffers a batch of this size needs
            asyncio.run(generate_many(url, [""] * args.resident))
            report["after_bare_batch"] = proc_mem(proc.pid)
            g = torch.Generator().manual_seed(0)
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in tqdm(range(args.tasks), desc="uploading prefixes"):
                    kv = torch.randn(spec.num_layers, 2, spec.num_kv_heads, args.prefix_length, spec.head_dim,
                                     generator=g) * 0.5
                    m, t = build_artifact(kv, spec.fingerprint(), description=f"bench task {i}").to_bytes()
                    r = c.put(f"/prefixes/task{i}", files=[("files", ("manifest.json", m)),
                                                           ("files", ("prefix.safetensors", t))])
                    r.raise_for_status()
            report["after_upload"] = proc_mem(proc.pid)
            t0 = time.perf_counter()
            codes = asyncio.run(generate_many(url, [f"task{i}" for i in range(args.resident)]))
            report["serve_resident_s"] = time.perf_counter() - t0
            report["status_codes"] = sorted(set(codes))
            report["after_serving_resident"] = proc_mem(proc.pid)
            # cycle through 3x as many tasks as fit: the cache evicts and stays within its bound
            for k in range(1, 3):
                asyncio.run(generate_many(url, [f"task{i}" for i in range(k * args.resident, (k + 1) * args.resident)]))
            report["after_cycling"] = proc_mem(proc.pid)
            metrics = httpx.get(f"{url}/metrics").text
            report["metrics"] = [ln for ln in metrics.splitlines() if ln.startswith("prefixserve_prefix_cache")]
        finally:
            proc.terminate()
            proc.wait(30)
    base = report["after_bare_batch"]["VmHWM"]
    report["peak_rss_mib"] = report["after_cycling"]["VmHWM"]
    report["growth_mib_for_tasks"] = report["peak_rss_mib"] - base
    report["resident_prefix_mib"] = per_prefix * args.resident / 2**20
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "memory.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
