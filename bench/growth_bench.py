"""KV-cache growth: how long the engine stalls while its buffers grow, with and without rows made ahead of time.

    python -m bench.growth_bench              # GPT-2-small-shaped random model, rows joining one per step up to 64
    python -m bench.growth_bench --quick      # tiny model

Requests join a running engine one per step (a load that ramps up) until `--rows` run together, each generating
`--new-tokens` tokens, greedy, EOS ignored. Every time a join needs more rows than the buffers hold, the slot cache
doubles them; the time each growth takes (`SlotKVCache.reserve`, timed around the call) is time every running row
waits. Two ways, alternating, on one model: `prefetch` (the default: past half the rows the next doubling is zeroed
on a background thread, kv_cache.py) and `on_demand` (the buffers are allocated when the growth needs them).
Reports the total and the longest stall of each, and checks that both ways produce the same tokens. Writes
bench/out/growth.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from bench.common import gpt2_small
from server.engine.engine import Engine, EngineConfig
from server.engine.sampling import SamplingParams

logger = logging.getLogger("bench.growth")


def ramp(loaded, rows: int, new: int, prefetch: bool) -> dict:
    """Rows join one per step; the stalls of every growth and the tokens of every request."""
    engine = Engine(loaded, EngineConfig(max_batch_size=rows, max_seq_len=1024))
    cache = engine.cache
    if not prefetch:
        cache.prefetch_limit = None
    stalls: list[float] = []
    sizes: list[int] = []
    reserve = cache.reserve

    def timed_reserve(*args):
        before = (cache.capacity_rows, cache.capacity_len)
        t0 = time.perf_counter()
        reserve(*args)
        if (cache.capacity_rows, cache.capacity_len) != before:
            stalls.append(time.perf_counter() - t0)
            sizes.append(cache.capacity_rows)
    cache.reserve = timed_reserve
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    handles = []
    t0 = time.perf_counter()
    for i in range(rows):
        handles.append(engine.submit([(7 * i + k) % loaded.spec.vocab_size for k in range(8)], sp))
        engine.step()
    while not all(h.done for h in handles):
        engine.step()
    return {"wall_s": time.perf_counter() - t0, "growths": len(stalls), "stall_s": sum(stalls),
            "longest_stall_s": max(stalls, default=0.0), "prefetched_growths": cache.prefetched_growths,
            "stall_s_by_rows_after": dict(zip(sizes, stalls)),
            "ids": [h.wait(0).token_ids for h in handles]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=72, help="long enough for every row to overlap the last join")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model instead of GPT-2-small shapes")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # as the server runs on this 2-core machine: the other core is free for the spare
    shape = "tiny" if args.quick else "gpt2-small"
    if args.quick:
        from tests.tiny import loaded_tiny
        loaded = loaded_tiny("gpt2")
    else:
        loaded = gpt2_small()
    out: dict = {"model": shape, "rows": args.rows, "new_tokens": args.new_tokens}
    for r in range(args.repeats):
        for name, prefetch in (("prefetch", True), ("on_demand", False)):
            res = ramp(loaded, args.rows, args.new_tokens, prefetch)
            logger.info("%s run %d: %d growths, %.3f s stalled (longest %.3f s), %d prefetched", name, r + 1,
                        res["growths"], res["stall_s"], res["longest_stall_s"], res["prefetched_growths"])
            if name not in out or res["stall_s"] < out[name]["stall_s"]:
                out[name] = res
    out["same_tokens"] = out["prefetch"]["ids"] == out["on_demand"]["ids"]
    for name in ("prefetch", "on_demand"):
        out[name].pop("ids")
    out["stall_ratio_on_demand_over_prefetch"] = out["on_demand"]["stall_s"] / max(out["prefetch"]["stall_s"], 1e-9)
    path = Path(args.out)
    path = path if path.suffix == ".json" else path / "growth.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
