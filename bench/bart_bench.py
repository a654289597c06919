"""BART benchmark: the engine against HF PEFT generate on bart-base-shaped random weights, in one process.

    python -m bench.bart_bench                # writes bench/out/bart.json
    python -m bench.bart_bench --quick        # without (iv) PEFT one request at a time

The engine bench's workload (issue 2), with the input going to the encoder: 32 concurrent requests over 8 tasks,
inputs of 24 +- 4 tokens, 32 new tokens, greedy, EOS ignored. Tasks are PEFT seq2seq prefix-tuning adapters
(prefix lengths 5, 10, 15, 20; PEFT applies them to decoder self-attention only) so that PEFT can run them too:
(i) engine, mixed tasks; (ii) engine, all on one task; (iii) PEFT generate, one batch per task; (iv) PEFT generate,
one request at a time. Then the same mixed/one-task pair with Li & Liang prefixes, which PEFT cannot run: all
three prefixes per task (encoder, decoder, cross-attention; lengths 5-20 each, different per task), "from_zero".
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
from basemodel.model import LoadedModel
from bench.common import Job, bart_base, make_adapters, workload
from bench.engine_bench import load_peft, run_engine
from prefix_store.artifact import build_artifact
from prefix_store.peft_io import read_dir
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig

logger = logging.getLogger("bench")


def peft_seq2seq(model, jobs: list[Job], new: int, batch_per_task: bool) -> dict:
    """HF PEFT generate on the encoder inputs (right-padded with a mask), one batch per task or one at a time."""
    groups: dict[int, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.task if batch_per_task else i, []).append(i)
    t_total, ids_out = 0.0, {}
    for idx in tqdm(list(groups.values()), desc="peft " + ("per task" if batch_per_task else "one at a time"),
                    leave=False):
        model.set_adapter(f"t{jobs[idx[0]].task}")
        width = max(len(jobs[i].prompt) for i in idx)
        ids = torch.ones(len(idx), width, dtype=torch.long)  # BART's <pad> is 1
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(jobs[i].prompt)] = torch.tensor(jobs[i].prompt)
            mask[r, :len(jobs[i].prompt)] = 1
        gen = copy.deepcopy(model.generation_config)  # EOS ignored as the engine ignores it (no stop, not masked)
        # no stop on EOS without masking it: an EOS id outside the vocabulary (None would mean "the model default")
        gen.eos_token_id, gen.forced_eos_token_id, gen.max_new_tokens, gen.do_sample = [-1], None, new, False
        gen.num_beams = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        t_total += time.perf_counter() - t0
        for r, i in enumerate(idx):
            ids_out[i] = out[r, 1:].tolist()  # after decoder_start_token_id
    return {"wall_s": t_total, "tokens": new * len(jobs), "ids": [ids_out[i] for i in range(len(jobs))]}


def li_liang_prefixes(loaded: LoadedModel, n_tasks: int, lengths: list[int]) -> list[DevicePrefix]:
    """Random Li & Liang prefixes (all three, "from_zero"), validated as artifacts, on the model's device."""
    s, out = loaded.spec, []
    for i in range(n_tasks):
        g = torch.Generator().manual_seed(200 + i)
        p, p_enc, p_cross = (lengths[(i + k) % len(lengths)] for k in range(3))
        dec = torch.randn(s.num_layers, 2, s.num_kv_heads, p, s.head_dim, generator=g)
        enc = torch.randn(s.num_encoder_layers, 2, s.num_encoder_kv_heads, p_enc, s.encoder_head_dim, generator=g)
        cross = torch.randn(s.num_layers, 2, s.num_kv_heads, p_cross, s.head_dim, generator=g)
        art = build_artifact(dec, s.fingerprint(), encoder_kv=enc, cross_kv=cross, positions="from_zero")
        out.append(DevicePrefix.from_artifact(art.manifest.sha256, art, loaded.device, loaded.dtype))
    return out


def bench(loaded: LoadedModel, args, tmp: Path) -> dict:
    """All scenarios; tokens/s of each and the ratios."""
    lengths = [5, 10, 15, 20]
    adapters = make_adapters(loaded, args.tasks, tmp, lengths)
    peft_prefixes = []
    for d in adapters:
        art = artifact_from_files(read_dir(d), loaded)
        peft_prefixes.append(DevicePrefix.from_artifact(art.manifest.sha256, art, loaded.device, loaded.dtype))
    li_prefixes = li_liang_prefixes(loaded, args.tasks, lengths)
    jobs = workload(args.requests, args.tasks, loaded.spec.vocab_size, args.prompt_len)
    one_task = [Job(j.prompt, 0) for j in jobs]
    peft = load_peft(loaded, adapters)
    # the KV buffers stay grown between scenarios (as under steady load): with the default 5 s idle release, an
    # engine scenario that follows a PEFT one (15-40 s) would regrow them, and pay page faults the others do not
    engine = Engine(loaded, EngineConfig(max_batch_size=max(64, args.requests), idle_release_s=3600))
    engine.start()
    run_engine(engine, jobs, li_prefixes, 4)  # warm-up: grow the caches, touch every code path
    new = args.new_tokens
    scenarios = {
        "engine_mixed": lambda: run_engine(engine, jobs, peft_prefixes, new),
        "engine_one_task": lambda: run_engine(engine, one_task, peft_prefixes, new),
        "peft_per_task": lambda: peft_seq2seq(peft, jobs, new, batch_per_task=True),
        "engine_mixed_li_liang": lambda: run_engine(engine, jobs, li_prefixes, new),
        "engine_one_task_li_liang": lambda: run_engine(engine, one_task, li_prefixes, new),
    }
    if not args.quick:
        scenarios["peft_one_at_a_time"] = lambda: peft_seq2seq(peft, jobs, new, batch_per_task=False)
    out: dict = {"model": loaded.name, "params": sum(p.numel() for p in loaded.model.parameters())}
    # round robin, best of `repeats` each: on a shared machine, every side sees the same spread of load
    for _ in range(args.repeats):
        for name, run in scenarios.items():
            r = run()
            if name not in out or r["wall_s"] < out[name]["wall_s"]:
                out[name] = r
    engine.stop()
    out["engine_equals_peft_rows"] = sum(a == b for a, b in zip(out["engine_mixed"]["ids"],
                                                                out["peft_per_task"]["ids"]))
    for r in out.values():
        if isinstance(r, dict) and "wall_s" in r:
            r["tok_s"] = r["tokens"] / r["wall_s"]
            r.pop("ids")
    tok = {k: r["tok_s"] for k, r in out.items() if isinstance(r, dict) and "tok_s" in r}
    out["ratios"] = {"mixed_over_one_task": tok["engine_mixed"] / tok["engine_one_task"],
                     "mixed_over_peft_per_task": tok["engine_mixed"] / tok["peft_per_task"],
                     "li_liang_mixed_over_one_task": tok["engine_mixed_li_liang"] / tok["engine_one_task_li_liang"],
                     "li_liang_mixed_over_peft_mixed": tok["engine_mixed_li_liang"] / tok["engine_mixed"]}
    if "peft_one_at_a_time" in tok:
        out["ratios"]["mixed_over_peft_one_at_a_time"] = tok["engine_mixed"] / tok["peft_one_at_a_time"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip (iv) PEFT one at a time")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = bart_base(dtype=getattr(torch, args.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(loaded, args, Path(tmp))
    doc = {"dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args),
           "result": result}
    stem = "bart" if args.dtype == "float32" else f"bart-{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
