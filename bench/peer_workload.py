"""The peer benchmark's workload and arithmetic: prompts from real data, the jobs of a round, round statistics,
medians over rounds and the printed table (no server, no model: tests/bench covers this module)."""
from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import percentile
from trainer.data import prompt_for, read_e2e_csv, read_webnlg_json

SERVERS = ("prefixserve", "llama-server")
TARGET_CHARS = 76  # inputs of ~76 characters are ~21 SmolLM2 tokens with the newline (64 E2E MRs: 15-27, mean 21.4)
MIXED_TASKS = ("e2e", "webnlg", None)  # the mixed case's rows, round robin: the shipped prefixes, then a bare row
METRICS = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "wall_s")


def closest_inputs(texts: list[str], n: int, target_chars: int = TARGET_CHARS) -> list[str]:
    """The n distinct texts whose length is closest to target_chars, closest first (ties: first seen first)."""
    distinct = list(dict.fromkeys(texts))
    if len(distinct) < n:
        raise ValueError(f"asked for {n} distinct inputs, the data has {len(distinct)}")
    order = sorted(range(len(distinct)), key=lambda i: (abs(len(distinct[i]) - target_chars), i))
    return [distinct[i] for i in order[:n]]


def e2e_prompts(data_dir: Path, n: int) -> list[str]:
    """n distinct E2E prompts (linearised MR + newline, as the e2e prefix expects): the test set's MRs, then the
    dev set's, closest to TARGET_CHARS first. Deterministic: the same data gives the same list."""
    d = data_dir / "e2e"
    mrs = [e.input for f in ("testset_w_refs.csv", "devset.csv") for e in read_e2e_csv(d / f)]
    return [prompt_for(m) for m in closest_inputs(mrs, n)]


def webnlg_prompts(data_dir: Path, n: int) -> list[str]:
    """n distinct WebNLG prompts (linearised triples + newline) from dev.json, closest to TARGET_CHARS first."""
    return [prompt_for(t) for t in closest_inputs([e.input for e in read_webnlg_json(data_dir / "webnlg" /
                                                                                       "dev.json")], n)]


def level_jobs(prompts: list[str], n: int) -> list[tuple[str | None, str]]:
    """A concurrency level's jobs: the first n prompts, no task (bare rows on both servers)."""
    if n > len(prompts):
        raise ValueError(f"{n} concurrent requests need {n} prompts, there are {len(prompts)}")
    return [(None, p) for p in prompts[:n]]


def mixed_jobs(e2e: list[str], webnlg: list[str], n: int) -> list[tuple[str | None, str]]:
    """The mixed case: row i runs task MIXED_TASKS[i % 3] on prompt i of its data (E2E for bare rows too), so
    every prompt is distinct; llama-server gets the same prompts bare."""
    jobs = []
    for i in range(n):
        task = MIXED_TASKS[i % len(MIXED_TASKS)]
        jobs.append((task, (webnlg if task == "webnlg" else e2e)[i]))
    return jobs


def round_order(round_index: int) -> tuple[str, str]:
    """Which server goes first in a round: prefixserve in even rounds, llama-server in odd ones."""
    return SERVERS if round_index % 2 == 0 else SERVERS[::-1]


def round_stats(results: list[dict], wall_s: float) -> dict:
    """One round: generated tokens (from each response's usage) over the round's wall time, TTFT p50/p99."""
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["completion_tokens"] for r in results)
    return {"requests": len(results), "completion_tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in results)}


def summarize(runs: list[dict]) -> dict:
    """Every run and the median of each metric over the runs."""
    return {"runs": runs, "median": {k: statistics.median(r[k] for r in runs) for k in METRICS}}


def table(results: dict) -> str:
    """A markdown table: each case, both servers' medians (every run's tokens/s beside), and the ratio."""
    lines = ["| case | prefixserve tok/s | llama-server tok/s | ratio | TTFT p50 (ps / llama) | TTFT p99 (ps / llama) |",
             "|---|---:|---:|---:|---:|---:|"]
    for case, by_server in results.items():
        ps, ll = by_server["prefixserve"], by_server["llama-server"]
        runs = lambda s: ", ".join(f"{r['tokens_per_s']:.0f}" for r in s["runs"])  # noqa: E731
        m, n = ps["median"], ll["median"]
        lines.append(f"| {case} | {m['tokens_per_s']:.1f} ({runs(ps)}) | {n['tokens_per_s']:.1f} ({runs(ll)}) | "
                     f"x{m['tokens_per_s'] / n['tokens_per_s']:.2f} | {m['ttft_p50_s']:.3f} / {n['ttft_p50_s']:.3f} s"
                     f" | {m['ttft_p99_s']:.3f} / {n['ttft_p99_s']:.3f} s |")
    return "\n".join(lines)
