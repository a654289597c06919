"""The peer benchmark's pure parts (bench/peer_workload.py, bench/llama_server.py): its prompts, its arithmetic
and llama-server's command line. No llama.cpp build, no server: the benchmark itself is not a test."""
from __future__ import annotations

import math

import pytest

from bench.common import percentile
from bench.llama_server import cache_dir, embedded_gguf, server_command
from bench.peer_workload import (closest_inputs, e2e_prompts, level_jobs, mixed_jobs, round_order, round_stats,
                                 summarize, table, webnlg_prompts)
from trainer.data import data_dir

DATA = data_dir()
needs_data = pytest.mark.skipif(not (DATA / "e2e").is_dir(), reason=f"no shared data at {DATA}")


def test_closest_inputs_are_distinct_nearest_first_and_stable():
    texts = ["a" * 10, "b" * 70, "c" * 76, "b" * 70, "d" * 82, "e" * 76, "f" * 200]
    assert closest_inputs(texts, 4) == ["c" * 76, "e" * 76, "b" * 70, "d" * 82]  # ties: first seen first
    assert closest_inputs(texts, 6, target_chars=0)[0] == "a" * 10
    with pytest.raises(ValueError, match="asked for 7 distinct inputs, the data has 6"):
        closest_inputs(texts, 7)


@needs_data
def test_prompts_are_real_distinct_deterministic_and_short():
    e2e = e2e_prompts(DATA, 64)
    assert e2e == e2e_prompts(DATA, 64) and len(set(e2e)) == 64
    assert e2e_prompts(DATA, 8) == e2e[:8]  # a lower level's prompts are the first of a higher one's
    assert all(p.startswith("name : ") and p.endswith("\n") and p.count("\n") == 1 for p in e2e)
    assert 65 <= sum(map(len, e2e)) / 64 <= 85  # ~21 SmolLM2 tokens (measured: 15-27, mean 21.4)
    web = webnlg_prompts(DATA, 32)
    assert len(set(web)) == 32 and all(p.count(" : ") >= 2 and p.endswith("\n") for p in web)


def test_level_and_mixed_jobs():
    e2e, web = [f"e{i}\n" for i in range(40)], [f"w{i}\n" for i in range(40)]
    assert level_jobs(e2e, 3) == [(None, "e0\n"), (None, "e1\n"), (None, "e2\n")]
    with pytest.raises(ValueError, match="64 concurrent requests need 64 prompts, there are 40"):
        level_jobs(e2e, 64)
    mixed = mixed_jobs(e2e, web, 32)
    assert mixed[:4] == [("e2e", "e0\n"), ("webnlg", "w1\n"), (None, "e2\n"), ("e2e", "e3\n")]
    assert [t for t, _ in mixed].count(None) == 10 and len({p for _, p in mixed}) == 32


def test_rounds_alternate_which_server_goes_first():
    assert [round_order(i)[0] for i in range(4)] == ["prefixserve", "llama-server"] * 2
    assert set(round_order(1)) == {"prefixserve", "llama-server"}


def test_round_stats_and_median():
    results = [{"ttft_s": t, "completion_tokens": 32, "prompt_tokens": 20 + i} for i, t in
               enumerate([0.1, 0.4, 0.2, 0.3])]
    s = round_stats(results, wall_s=2.0)
    assert s["completion_tokens"] == 128 and s["tokens_per_s"] == 64.0
    assert s["ttft_p50_s"] == pytest.approx(0.25) and s["ttft_p99_s"] == 0.4 and s["prompt_tokens_mean"] == 21.5
    runs = [dict(s, tokens_per_s=x, wall_s=x) for x in (50.0, 70.0, 60.0)]
    summary = summarize(runs)
    assert summary["runs"] == runs and summary["median"]["tokens_per_s"] == 60.0
    assert percentile([], 0.5) != percentile([], 0.5) and math.isnan(percentile([], 0.99))
    assert percentile(list(range(100)), 0.99) == 99 and percentile([3.0], 0.99) == 3.0


def test_table_names_both_servers_every_run_and_the_ratio():
    case = {"prefixserve": summarize([{"tokens_per_s": 30.0, "ttft_p50_s": 0.5, "ttft_p99_s": 0.9, "wall_s": 1},
                                      {"tokens_per_s": 20.0, "ttft_p50_s": 0.7, "ttft_p99_s": 1.1, "wall_s": 1}]),
            "llama-server": summarize([{"tokens_per_s": 100.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "wall_s": 1}])}
    row = table({"c8": case}).splitlines()[-1]
    assert row == "| c8 | 25.0 (30, 20) | 100.0 (100) | x0.25 | 0.600 / 0.100 s | 1.000 / 0.200 s |"


def test_llama_server_command_line(tmp_path, monkeypatch):
    cmd = server_command("/bin/llama-server", "/m.gguf", slots=32, port=8123, threads=2, ctx_per_slot=128)
    assert cmd[:2] == ["/bin/llama-server", "-m"]
    for flag, value in [("-m", "/m.gguf"), ("-np", "32"), ("-t", "2"), ("-tb", "2"), ("-c", "4096"),
                        ("--host", "127.0.0.1"), ("--port", "8123"), ("--cache-ram", "0"), ("--cache-reuse", "0")]:
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert "-cb" in cmd and "--no-webui" in cmd and "--no-cache-prompt" in cmd
    assert server_command("b", "m", 1, 1, 1, extra=["--foo", "1"])[-2:] == ["--foo", "1"]
    monkeypatch.setenv("PREFIXSERVE_CACHE_DIR", str(tmp_path))  # the project's cache convention
    assert cache_dir("9.9.9") == tmp_path / "llama.cpp" / "9.9.9"


def test_embedded_gguf_is_the_packages_file():
    path = embedded_gguf()
    with open(path, "rb") as f:
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and f.read(4) == b"GGUF"
