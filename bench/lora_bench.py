"""LoRA benchmark: LoRA rows in the engine's mixed batches against one adapter, prefix-only batches and PEFT.

    python -m bench.lora_bench                       # both models, 3 rounds, writes bench/out/lora.json
    python -m bench.lora_bench --models gpt2 --rounds 1

Workload (issue 18): 32 concurrent requests (prompts of ~24 random tokens, 32 new tokens, greedy, EOS ignored)
over 8 LoRA adapters of rank 8 on the attention's query/value projections (LLaMA: q_proj and v_proj; GPT-2: its
fused q/k/v projection c_attn, PEFT's default target), random weights. Each round runs, on one warm engine:

    lora_mixed      32 requests over the 8 LoRA adapters
    lora_one        the same 32 prompts all on one LoRA adapter
    mixed_4_4       the same prompts over 4 LoRA adapters and 4 prefix-tuning tasks (P = 5, 10, 15, 20)
    prefix_mixed    the same prompts over 8 prefix-tuning tasks (prefix-only mixed)
    bare            the same prompts on the base model alone
    bare_unwrapped  the same, with the serving model's LoRA wrappers taken out (what a bare row pays for them)
    peft_per_task   HF PEFT generate, one batch per LoRA adapter (set_adapter), the baseline a PEFT user runs

and the ratios asked for, each from the runs of one round (never across rounds): lora_mixed / lora_one,
lora_mixed / peft_per_task, mixed_4_4 / prefix_mixed; the per-row cost of a LoRA row against a bare row in the
decode step (seconds per row-step, from the engine's decode counters), and bare / bare_unwrapped. Every round is
reported, and the median.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from basemodel.convert import artifact_from_files
from basemodel.lora import module_table
from bench.common import Job, embedded, gpt2_small, make_adapters, workload
from bench.engine_bench import load_peft, peft_batches
from prefix_store.peft_io import read_dir
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig, generate_sync
from server.engine.lora import DeviceLora, LoraLinear
from server.engine.sampling import SamplingParams

logger = logging.getLogger("bench")
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def make_lora_adapters(loaded, n: int, out: Path, r: int = 8) -> list[Path]:
    """Save n PEFT LoRA adapter directories of rank r on the query/value projections, random A and B (written
    directly: PEFT's get_peft_model would inject layers into the loaded model itself)."""
    targets = TARGETS[loaded.spec.model_type]
    table = module_table(loaded.model)
    modules = [m for m, s in table.items() if isinstance(s, tuple) and m.rsplit(".", 1)[-1] in targets]
    dirs = []
    for i in range(n):
        g = torch.Generator().manual_seed(500 + i)
        weights = {}
        for m in modules:
            d_in, d_out = table[m]
            weights[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, d_in, generator=g) / d_in ** 0.5
            weights[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.05
        d = out / f"lora{i}"
        d.mkdir(parents=True)
        save_file(weights, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": targets,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": loaded.spec.model_type == "gpt2",
            "inference_mode": True}))
        dirs.append(d)
    return dirs


def run(engine: Engine, jobs: list[Job], payloads: list, new: int) -> dict:
    """Submit all jobs at once; wall time until the last finishes, and the decode step's seconds per row."""
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    s0 = (engine.stats.decode_seconds, engine.stats.decode_row_steps)
    t0 = time.perf_counter()
    res = generate_sync(engine, [j.prompt for j in jobs], sp, [payloads[j.task] for j in jobs])
    wall = time.perf_counter() - t0
    decode_s, rows = engine.stats.decode_seconds - s0[0], engine.stats.decode_row_steps - s0[1]
    tokens = sum(r.generated_tokens for r in res)
    return {"wall_s": wall, "tok_s": tokens / wall, "decode_s_per_row_step": decode_s / max(rows, 1),
            "ids": [r.token_ids for r in res]}


@contextmanager
def unwrapped(engine: Engine) -> Iterator[None]:
    """Within: the engine's serving model runs its linear layers without the LoRA wrappers (bare rows only)."""
    runner = engine.runner
    model, head = runner.model, runner.head
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name, m in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.base)
    runner.head = head.base if isinstance(head, LoraLinear) else head  # the runner holds the LM head itself
    try:
        yield
    finally:
        for name, m in wrapped:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m)
        runner.head = head


def one_round(engine: Engine, jobs: list[Job], loras: list, prefixes: list, peft, lora_dirs: list[Path],
              new: int, repeats: int) -> dict:
    """Every engine scenario `repeats` times, interleaved, the fastest run of each kept (interference from other
    jobs on a shared machine only slows a run down); PEFT once. The round's ratios compare these."""
    one = [Job(j.prompt, 0) for j in jobs]
    scenarios = {"lora_mixed": (jobs, loras), "lora_one": (one, loras),
                 "mixed_4_4": (jobs, loras[:4] + prefixes[:4]),
                 "prefix_mixed": (jobs, prefixes), "bare": (jobs, [None] * len(loras)),
                 "bare_unwrapped": (jobs, [None] * len(loras))}
    r: dict = {}
    for _ in range(repeats):
        for name, (js, payloads) in scenarios.items():
            if name == "bare_unwrapped":
                with unwrapped(engine):
                    run_ = run(engine, js, payloads, new)
            else:
                run_ = run(engine, js, payloads, new)
            if name not in r or run_["wall_s"] < r[name]["wall_s"]:
                r[name] = run_
    r["peft_per_task"] = peft_batches(peft, lora_dirs, jobs, new, batch_per_task=True)
    r["peft_per_task"]["tok_s"] = r["peft_per_task"]["tokens"] / r["peft_per_task"]["wall_s"]
    ours, theirs = r["lora_mixed"]["ids"], r["peft_per_task"]["ids"]
    r["lora_rows_equal_peft_batches"] = sum(a == b for a, b in zip(ours, theirs))
    # a row that differs from PEFT's left-padded batch: compared with PEFT generate on that row alone (unpadded)
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    alone = peft_batches(peft, lora_dirs, [jobs[i] for i in differ], new, batch_per_task=False) if differ else None
    r["differing_rows_equal_peft_alone"] = sum(ours[i] == b for i, b in zip(differ, alone["ids"])) if alone else 0
    r["differing_rows"] = len(differ)
    for v in r.values():
        if isinstance(v, dict):
            v.pop("ids", None)
    lora_row, bare_row = r["lora_mixed"]["decode_s_per_row_step"], r["bare"]["decode_s_per_row_step"]
    r["ratios"] = {"lora_mixed_over_lora_one": r["lora_mixed"]["tok_s"] / r["lora_one"]["tok_s"],
                   "lora_mixed_over_peft_per_task": r["lora_mixed"]["tok_s"] / r["peft_per_task"]["tok_s"],
                   "mixed_4_4_over_prefix_mixed": r["mixed_4_4"]["tok_s"] / r["prefix_mixed"]["tok_s"],
                   "lora_row_over_bare_row_decode": lora_row / bare_row,
                   "bare_over_bare_unwrapped": r["bare"]["tok_s"] / r["bare_unwrapped"]["tok_s"]}
    return r


def wrapper_overhead(engine: Engine, rows: int = 1, repeats: int = 50) -> dict:
    """What the LoRA wrappers cost a forward with no LoRA row: every wrapped layer called on a [rows, in] input
    through the wrapper and straight to the layer it wraps, alternately (so both find the weights equally warm),
    `repeats` times; the fastest call of each (the one other jobs disturbed least), summed over the layers a
    forward calls once each."""
    from basemodel.lora import linear_shape

    wrapped = direct = 0.0
    layers = [m for m in engine.runner.model.modules() if isinstance(m, LoraLinear)]
    with torch.inference_mode():
        for m in layers:
            x = torch.randn(rows, getattr(m.base, "in_features", None) or linear_shape(m.base)[0])
            best = {m: float("inf"), m.base: float("inf")}
            for _ in range(repeats):
                for f in best:
                    t0 = time.perf_counter()
                    f(x)
                    best[f] = min(best[f], time.perf_counter() - t0)
            wrapped, direct = wrapped + best[m], direct + best[m.base]
    return {"rows": rows, "layers": len(layers), "wrapped_s": wrapped, "unwrapped_s": direct,
            "overhead_s": wrapped - direct, "overhead_share": (wrapped - direct) / direct}


def bench_model(name: str, loaded, args, tmp: Path) -> dict:
    """All rounds for one model; the engine is made before PEFT touches the model (PEFT injects its layers)."""
    lora_dirs = make_lora_adapters(loaded, args.tasks, tmp / f"{name}-lora")
    loras = []
    for d in lora_dirs:
        art = artifact_from_files(read_dir(d), loaded)
        loras.append(DeviceLora.from_artifact(art.manifest.sha256, art, loaded.device, loaded.dtype))
    prefixes = []
    for d in make_adapters(loaded, args.tasks, tmp / f"{name}-prefix", lengths=[5, 10, 15, 20]):
        art = artifact_from_files(read_dir(d), loaded)
        prefixes.append(DevicePrefix(art.manifest.sha256, art.kv.to(loaded.dtype)))
    jobs = workload(args.requests, args.tasks, loaded.spec.vocab_size, args.prompt_len)
    engine = Engine(loaded, EngineConfig(max_batch_size=max(64, args.requests)))
    engine.start()
    run(engine, jobs, loras, 4)  # warm-up: grow the cache to 32 rows, touch every code path
    run(engine, jobs, prefixes, 4)
    # on the engine's thread, between steps (the engine owns the model)
    overhead = engine.run_exclusive(lambda: [wrapper_overhead(engine, rows) for rows in (1, 32)]).result()
    logger.info("%s wrapper overhead: %s", name, json.dumps(overhead))
    peft = load_peft(loaded, lora_dirs) if args.rounds else None
    rounds = []
    for i in range(args.rounds):
        rounds.append(one_round(engine, jobs, loras, prefixes, peft, lora_dirs, args.new_tokens, args.repeats))
        logger.info("%s round %d: %s", name, i + 1, json.dumps(rounds[-1]["ratios"]))
    engine.stop()
    median = {k: statistics.median(r["ratios"][k] for r in rounds) for k in rounds[0]["ratios"]} if rounds else {}
    return {"model": loaded.name, "rounds": rounds, "median_ratios": median, "wrapper_overhead": overhead,
            "lora_adapter_bytes": loras[0].nbytes, "lora_rank": loras[0].rank}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,embedded")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each engine scenario per round (the fastest kept)")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    logger.info("CPU %s, %d torch threads, load average %s", cpu_name(), torch.get_num_threads(), os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            loaded = gpt2_small() if name == "gpt2" else embedded()
            results.append(bench_model(name, loaded, args, Path(tmp)))
            print(json.dumps({"model": results[-1]["model"], "median_ratios": results[-1]["median_ratios"]}))
    doc = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_name(), "args": vars(args),
           "load_average_after": os.getloadavg(), "results": results}
    (out / "lora.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out / 'lora.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
