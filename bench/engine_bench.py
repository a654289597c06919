"""Engine benchmark: this engine against HF PEFT generate, side by side in one process.

    python -m bench.engine_bench                    # both models, writes bench/out/engine.{json,png}
    python -m bench.engine_bench --models gpt2 --quick

Workload (issue 2): 32 concurrent requests over 8 tasks, prompts of ~24 tokens, 32 new tokens, greedy, EOS
ignored. Scenarios: (i) engine, mixed tasks; (ii) engine, all on one task; (iii) PEFT generate, one batch per
task; (iv) PEFT generate, one request at a time. Plus the machine's fp32 matmul peak, the FLOP/s the engine
reaches, and tokens/s against batch size for the engine and for PEFT generate (one task).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from basemodel.convert import artifact_from_files
from bench.common import Job, embedded, flops_per_token, gpt2_small, make_adapters, measure_matmul_peak, workload
from prefix_store.peft_io import read_dir
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig, generate_sync
from server.engine.sampling import SamplingParams
from trainer.plots import saved_figure

logger = logging.getLogger("bench")


def run_engine(engine: Engine, jobs: list[Job], prefixes: list[DevicePrefix], new: int) -> dict:
    """Submit all jobs at once; wall time until the last finishes."""
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    s0 = (engine.stats.decode_seconds, engine.stats.decode_row_steps, engine.stats.steps)
    t0 = time.perf_counter()
    res = generate_sync(engine, [j.prompt for j in jobs], sp, [prefixes[j.task] for j in jobs])
    wall = time.perf_counter() - t0
    st = engine.stats
    decode_s, rows = st.decode_seconds - s0[0], st.decode_row_steps - s0[1]
    return {"wall_s": wall, "tokens": sum(r.generated_tokens for r in res), "ids": [r.token_ids for r in res],
            "prompt_tokens": sum(len(j.prompt) for j in jobs), "decode_tokens_per_s": rows / max(decode_s, 1e-9),
            "mean_decode_batch": rows / max(st.steps - s0[2], 1)}


def peft_batches(model, adapters: list[Path], jobs: list[Job], new: int, batch_per_task: bool) -> dict:
    """HF PEFT generate: one PeftModel holding every adapter, switched with set_adapter."""
    t_total, ids_out, tokens = 0.0, {}, 0
    groups: dict[int, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.task, []).append(i)
    batches = [idx for idx in groups.values()] if batch_per_task else [[i] for i in range(len(jobs))]
    for idx in tqdm(batches, desc="peft " + ("per task" if batch_per_task else "one at a time"), leave=False):
        model.set_adapter(f"t{jobs[idx[0]].task}")
        width = max(len(jobs[i].prompt) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):  # left padding, as generate expects for decoder-only models
            p = jobs[i].prompt
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        # EOS ignored the way the engine ignores it (no stop, not masked): min_new_tokens would mask EOS instead
        gen = copy.deepcopy(model.generation_config)
        gen.eos_token_id, gen.max_new_tokens, gen.do_sample, gen.pad_token_id = None, new, False, 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        t_total += time.perf_counter() - t0
        for r, i in enumerate(idx):
            ids_out[i] = out[r, width:].tolist()
            tokens += new
    return {"wall_s": t_total, "tokens": tokens, "ids": [ids_out[i] for i in range(len(jobs))]}


def load_peft(loaded, adapters: list[Path]):
    """One PeftModel with all adapters loaded (what a PEFT user would run)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(loaded.model, str(adapters[0]), adapter_name="t0")
    for i, d in enumerate(adapters[1:], 1):
        model.load_adapter(str(d), adapter_name=f"t{i}")
    return model.eval()


def bench_model(name: str, loaded, args, peak: float, tmp: Path) -> dict:
    """All scenarios for one model."""
    fpt = flops_per_token(loaded.model)
    adapters = make_adapters(loaded, args.tasks, tmp / name, lengths=[5, 10, 15, 20])
    prefixes = []
    for d in adapters:
        art = artifact_from_files(read_dir(d), loaded)
        prefixes.append(DevicePrefix(art.manifest.sha256, art.kv.to(loaded.dtype)))
    jobs = workload(args.requests, args.tasks, loaded.spec.vocab_size, args.prompt_len)
    one_task = [Job(j.prompt, 0) for j in jobs]
    engine = Engine(loaded, EngineConfig(max_batch_size=max(64, args.requests)))
    engine.start()
    run_engine(engine, jobs, prefixes, 4)  # warm-up: grow the cache to 32 rows, touch every code path
    out: dict = {"model": loaded.name, "flops_per_token": fpt, "params": sum(p.numel() for p in loaded.model.parameters())}
    best = lambda f: min((f() for _ in range(args.repeats)), key=lambda r: r["wall_s"])  # noqa: E731
    out["engine_mixed"] = best(lambda: run_engine(engine, jobs, prefixes, args.new_tokens))
    out["engine_one_task"] = best(lambda: run_engine(engine, one_task, prefixes, args.new_tokens))
    peft = load_peft(loaded, adapters)
    out["peft_per_task"] = peft_batches(peft, adapters, jobs, args.new_tokens, batch_per_task=True)
    if not args.quick:
        out["peft_one_at_a_time"] = peft_batches(peft, adapters, jobs, args.new_tokens, batch_per_task=False)
    ref = out["peft_per_task"]["ids"]
    out["engine_equals_peft_rows"] = sum(a == b for a, b in zip(out["engine_mixed"]["ids"], ref))
    curve = []
    for b in tqdm(args.curve, desc=f"{name} batch-size curve", leave=False):
        cj = workload(b, args.tasks, loaded.spec.vocab_size, args.prompt_len, seed=b)
        e = run_engine(engine, cj, prefixes, args.new_tokens)
        p = peft_batches(peft, adapters, [Job(j.prompt, 0) for j in cj], args.new_tokens, batch_per_task=True)
        curve.append({"batch": b, "engine_tok_s": e["tokens"] / e["wall_s"], "peft_tok_s": p["tokens"] / p["wall_s"],
                      "engine_decode_tok_s": e["decode_tokens_per_s"]})
    out["curve"] = curve
    engine.stop()
    for k in ("engine_mixed", "engine_one_task", "peft_per_task", "peft_one_at_a_time"):
        if k in out:
            r = out[k]
            r["tok_s"] = r["tokens"] / r["wall_s"]
            r.pop("ids")
    m = out["engine_mixed"]
    out["ratios"] = {"mixed_over_one_task": m["tok_s"] / out["engine_one_task"]["tok_s"],
                     "mixed_over_peft_per_task": m["tok_s"] / out["peft_per_task"]["tok_s"]}
    if "peft_one_at_a_time" in out:
        out["ratios"]["mixed_over_peft_one_at_a_time"] = m["tok_s"] / out["peft_one_at_a_time"]["tok_s"]
    # FLOP/s: all processed tokens (prompt + generated) over wall time, and decode steps alone at batch 32
    out["engine_flops"] = (m["tokens"] + m["prompt_tokens"]) * fpt / m["wall_s"]
    out["engine_decode_flops"] = m["decode_tokens_per_s"] * fpt
    out["fraction_of_peak"] = out["engine_flops"] / peak
    out["decode_fraction_of_peak"] = out["engine_decode_flops"] / peak
    return out


def gemm_ceiling(loaded, rows: int, packed: bool = False) -> float:
    """FLOP/s of every weight matrix of the model (each linear layer and the LM head, once per pass, as a decode
    step streams them) multiplied by a [rows, in] activation: the decode step's matrix work with nothing else.
    `packed`: through the engine's prepacked layers (server/engine/packed.py) instead of torch's plain linear."""
    from server.engine.packed import PackedLinear, _as_linear, best_pass_seconds

    layers = [wb for m in loaded.model.modules() if (wb := _as_linear(m)) is not None]
    if loaded.model.get_output_embeddings() is not None and not any(
            w.data_ptr() == loaded.model.get_output_embeddings().weight.data_ptr() for w, _ in layers):
        layers.append((loaded.model.get_output_embeddings().weight, None))
    if packed:
        mods = [PackedLinear(w, b) for w, b in layers]
        calls = [(lambda x, m=m: m(x)) for m in mods]
    else:
        calls = [(lambda x, w=w.contiguous(), b=b: torch.nn.functional.linear(x, w, b)) for w, b in layers]
    xs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for w, _ in layers]
    flops = sum(2 * rows * w.numel() for w, _ in layers)
    return flops / best_pass_seconds([lambda f=f, x=x: f(x) for f, x in zip(calls, xs)])


def plot(results: list[dict], peak: float, path: Path, dtype: str = "float32") -> None:
    """Bar chart of the four scenarios and the batch-size curve, per model."""
    with saved_figure(path, 2, len(results), dpi=110, figsize=(6 * len(results), 8), squeeze=False) as (fig, axes):
        _draw(results, peak, dtype, fig, axes)


def _draw(results: list[dict], peak: float, dtype: str, fig, axes) -> None:
    """The panels of `plot`: per model, the scenarios' bars over the batch-size curve."""
    for col, r in enumerate(results):
        keys = [k for k in ("engine_mixed", "engine_one_task", "peft_per_task", "peft_one_at_a_time") if k in r]
        labels = {"engine_mixed": "(i) engine\nmixed tasks", "engine_one_task": "(ii) engine\none task",
                  "peft_per_task": "(iii) PEFT\nbatch per task", "peft_one_at_a_time": "(iv) PEFT\none at a time"}
        ax = axes[0][col]
        vals = [r[k]["tok_s"] for k in keys]
        ax.bar([labels[k] for k in keys], vals, color=["#2a7", "#5b9", "#c84", "#d96"][: len(keys)])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        ax.set_title(f"{r['model']}: 32 requests, 8 tasks")
        ax.set_ylabel("generated tokens / s")
        ax = axes[1][col]
        bs = [c["batch"] for c in r["curve"]]
        ax.plot(bs, [c["engine_tok_s"] for c in r["curve"]], "o-", label="engine (mixed tasks)")
        ax.plot(bs, [c["peft_tok_s"] for c in r["curve"]], "s--", label="PEFT generate (one task)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (batch size)")
        ax.set_ylabel("generated tokens / s")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"prefixserve engine vs HF PEFT generate, {dtype} (fp32 matmul peak {peak / 1e9:.0f} GFLOP/s)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON + PNG."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,embedded")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--curve", default="1,2,4,8,16,32,64")
    ap.add_argument("--quick", action="store_true", help="skip (iv) PEFT one at a time")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and activations of both the engine and PEFT (bf16 uses AMX where the CPU has it)")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    args.curve = [int(x) for x in args.curve.split(",") if x]
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = measure_matmul_peak()
    print(f"fp32 matmul peak (2048^3, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            loaded = gpt2_small(dtype=dtype) if name == "gpt2" else embedded(dtype)
            r = bench_model(name, loaded, args, peak, Path(tmp))
            r["gemm_ceiling_flops_at_32"] = gemm_ceiling(loaded, 32)
            r["packed_gemm_ceiling_flops_at_32"] = gemm_ceiling(loaded, 32, packed=True)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}, indent=1))
    doc = {"dtype": args.dtype, "matmul_peak_flops": peak, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "args": vars(args), "results": results}
    stem = "engine" if args.dtype == "float32" else f"engine-{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    plot(results, peak, out / f"{stem}.png", args.dtype)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
