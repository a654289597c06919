"""Training step time of each trainer method on the same batches, interleaved in one process (`seconds_per_step`:
the fastest step).

A run's own `train_seconds` (summary.json) depends on what else the machine was doing during that run; on a shared
machine runs taken hours apart do not compare. This bench takes every method's steps in turns (round r: k steps of
each method, in order), so slow load changes hit all methods alike, and reports the fastest and the median seconds per
step and the fastest-step ratio to full fine-tuning (on a busy machine the fastest step is the one least slowed by
others; keep every sample, and give a ratio only where the samples of each method agree).

    python -m bench.train_bench --model embedded --data e2e --steps 3 --rounds 3 --out bench/out/train
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from basemodel.model import load_model
from trainer.data import load_data
from trainer.loop import collate, encode, lm_loss, set_seed, subsample
from trainer.methods import METHODS, MethodConfig, TaskModel, parameter_counts

LR = {"prefix": 8e-4, "prefix-direct": 8e-4, "prompt": 3e-2, "lora": 5e-4, "finetune": 5e-5}


def make_step(task: TaskModel, lr: float):
    """One optimiser step of the training loop (forward, loss, backward, clip, AdamW) as a closure over a batch."""
    params = task.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr)

    def step(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
        loss = lm_loss(task(ids, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()
    return step


def run(model: str, data: str, methods: list[str], steps: int, rounds: int, batch_size: int, seed: int) -> dict:
    """Fastest and median seconds per step for each method (its first step, which allocates optimiser state, is not
    timed)."""
    set_seed(seed)
    d = load_data(data, seed=seed)
    tasks, steppers, counts = {}, {}, {}
    for m in methods:  # a fresh base model per method: LoRA wraps it, fine-tuning unfreezes it
        loaded = load_model(model, dtype="float32")
        tasks[m] = TaskModel(loaded, MethodConfig(method=m)).train()
        steppers[m] = make_step(tasks[m], LR[m])
        counts[m] = parameter_counts(tasks[m])
    tok = next(iter(tasks.values())).loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = encode(tok, subsample(d.train, batch_size * steps * rounds, seed), 128)
    batches = [collate(rows[i:i + batch_size], pad, "cpu") for i in range(0, len(rows), batch_size)]
    for m in methods:
        steppers[m](*batches[0])  # warm-up: optimiser state, allocator
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods:
            for b in batches[r * steps:(r + 1) * steps]:
                t0 = time.perf_counter()
                steppers[m](*b)
                times[m].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{rounds} {m}: {times[m][-1]:.2f} s/step", flush=True)
    best = {m: min(t) for m, t in times.items()}
    ref = best.get("finetune")
    return {"model": model, "batch_size": batch_size, "steps_per_round": steps, "rounds": rounds,
            "threads": torch.get_num_threads(), "seconds_per_step": best,
            "median_seconds_per_step": {m: statistics.median(t) for m, t in times.items()}, "all_seconds": times,
            "ratio_to_finetune": {m: v / ref for m, v in best.items()} if ref else None,
            "trained_params": {m: c["trained_params"] for m, c in counts.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_bench")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="e2e")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=3, help="steps of one method per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="directory for train_bench.json")
    a = ap.parse_args(argv)
    r = run(a.model, a.data, a.methods.split(","), a.steps, a.rounds, a.batch_size, a.seed)
    text = json.dumps(r, indent=1)
    print(json.dumps({k: r[k] for k in ("seconds_per_step", "ratio_to_finetune")}, indent=1))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "train_bench.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
