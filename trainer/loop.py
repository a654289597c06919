"""The training loop: tokenise, batch, optimise, log, checkpoint (resumable), plot, export.

Outputs in the run directory: metrics.jsonl (one JSON object per logged step / validation), checkpoint.pt (the
trainable state, optimiser, scheduler, step and RNG; resumed automatically), loss.png, summary.json and, for the
prefix methods, prefix/ (the native artifact the server loads) and peft/ (the same prefix as a PEFT adapter).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from basemodel.model import LoadedModel
from prefix_store.artifact import PrefixArtifact, build_artifact, save_dir
from prefix_store.peft_io import export_peft, write_dir
from trainer.data import DataSplits, Example, prompt_for
from trainer.e2e_data import fix_mrs, swap_values
from trainer.methods import PREFIX_METHODS, MethodConfig, TaskModel, parameter_counts
from trainer.plots import saved_figure
from trainer.seq2seq import Seq2SeqTaskModel, collate_seq2seq, encode_seq2seq, seq2seq_loss
from trainer.slots import is_e2e_input

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in summary.json and the manifest)."""

    method: MethodConfig = field(default_factory=MethodConfig)
    epochs: float = 5.0
    max_steps: int = 0  # 0: no limit besides epochs
    lr: float = 5e-5
    batch_size: int = 5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int = 128  # tokens per example (prompt + target); longer examples are cut
    max_train: int = 0  # 0: all training pairs; else a seeded random subsample of pairs
    max_valid: int = 200
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    fix_mrs: bool = False  # E2E: MRs reduced to what their references say (trainer.e2e_data.fix_mrs)
    swap_values: bool = False  # E2E: venue type and food drawn anew from the ontology each epoch (swap_values)


# Fields that only say when to log, validate and save: a run may resume with other values for them.
RESUMABLE_CHANGES = {"eval_every", "save_every", "log_every"}


def set_seed(seed: int) -> None:
    """Seed Python and torch."""
    random.seed(seed)
    torch.manual_seed(seed)


def subsample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A seeded random subset of n examples (all when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, n)


def encode(tokenizer, examples: list[Example], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) per example: the prompt as the server tokenises it, then target + EOS; prompt labels -100."""
    out = []
    for e in examples:
        prompt = tokenizer(prompt_for(e.input))["input_ids"]
        target = tokenizer(e.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + target)[:max_len]
        out.append((ids, ([-100] * len(prompt) + target)[:max_len]))
    return out


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels, each [B, L]."""
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return ids.to(device), mask.to(device), labels.to(device)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (logits [B, L, V], labels [B, L])."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def _causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return lm_loss(logits, labels)  # looked up at call time (a test interrupts training through it)


@dataclass(frozen=True)
class Recipe:
    """What differs between decoder-only and encoder-decoder training: task model, batches, loss, exports."""

    task: Callable[[LoadedModel, MethodConfig], nn.Module]
    encode: Callable[..., list]  # (tokenizer, examples, max_len) -> rows
    collate: Callable[..., tuple]  # (rows, pad_id, device) -> (*model inputs, labels)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> mean loss
    scored: Callable[[torch.Tensor], int]  # labels -> number of tokens the loss averages over
    peft_export: bool  # the prefix is also written as a PEFT adapter


RECIPES = {  # keyed by ModelSpec.is_encoder_decoder
    False: Recipe(TaskModel, encode, collate, _causal_loss, lambda y: int((y[:, 1:] != -100).sum()), True),
    True: Recipe(Seq2SeqTaskModel, encode_seq2seq, collate_seq2seq, seq2seq_loss, lambda y: int((y != -100).sum()),
                 False),  # PEFT's seq2seq prefix covers decoder self-attention only
}


def recipe_for(loaded: LoadedModel) -> Recipe:
    """The recipe for this base model's kind."""
    return RECIPES[loaded.spec.is_encoder_decoder]


@torch.no_grad()
def validation_loss(task: nn.Module, rows: list, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss on validation rows (eval mode)."""
    was = task.training
    task.eval()
    recipe = recipe_for(task.loaded)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        *inputs, labels = recipe.collate(rows[i:i + batch_size], pad_id, task.loaded.device)
        n = recipe.scored(labels)
        total += recipe.loss(task(*inputs), labels).item() * n
        count += n
    task.train(was)
    return total / max(count, 1)


def _schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))  # linear decay, as in the paper
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _trainable_state(task: TaskModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}


def _batches_for_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def training_examples(data: DataSplits, cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """The training and validation pairs the run uses (E2E fixing applied to both, then subsampled); validation
    pairs get one fixed value swap when training swaps values."""
    train_ex, valid_ex = data.train, data.valid
    if cfg.fix_mrs or cfg.swap_values:
        if not all(is_e2e_input(e.input) for e in train_ex + valid_ex):
            raise ValueError("--fix-mrs and --swap-values apply to E2E meaning representations only")
    if cfg.fix_mrs:
        train_ex, valid_ex = fix_mrs(train_ex), fix_mrs(valid_ex)
    valid_ex = subsample(valid_ex, cfg.max_valid, cfg.seed)
    if cfg.swap_values:
        valid_ex = [swap_values(e, -1 - cfg.seed) for e in valid_ex]
    return subsample(train_ex, cfg.max_train, cfg.seed), valid_ex


class EpochRows:
    """The encoded training rows of each epoch: the same every epoch, or re-drawn per epoch with swap_values."""

    def __init__(self, recipe: Recipe, tokenizer, examples: list[Example], cfg: TrainConfig):
        self.recipe, self.tokenizer, self.examples, self.cfg = recipe, tokenizer, examples, cfg
        self.epoch, self.rows = -1, recipe.encode(tokenizer, examples, cfg.max_len)

    def __call__(self, epoch: int) -> list:
        """Rows of this epoch (encoded once per epoch)."""
        if self.cfg.swap_values and epoch != self.epoch:
            swapped = [swap_values(e, self.cfg.seed * 1000 + epoch) for e in self.examples]
            self.epoch, self.rows = epoch, self.recipe.encode(self.tokenizer, swapped, self.cfg.max_len)
        return self.rows


def machine() -> dict:
    """Where a run ran: CPU model, core count and torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def train(loaded: LoadedModel, data: DataSplits, cfg: TrainConfig, out: str | Path,
          progress: bool = True) -> dict:
    """Train one method on `data`, writing the run directory `out`; returns the summary dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    recipe = recipe_for(loaded)
    train_ex, valid_ex = training_examples(data, cfg)
    epoch_rows = EpochRows(recipe, loaded.tokenizer, train_ex, cfg)
    rows = epoch_rows.rows
    valid_rows = recipe.encode(loaded.tokenizer, valid_ex, cfg.max_len)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    task = recipe.task(loaded, cfg.method)
    counts = parameter_counts(task)
    logger.info("trainable parameters: %d (%.4f%% of the base model); stored: %d (%.4f%%)",
                counts["trained_params"], 100 * counts["trained_share"], counts["stored_params"],
                100 * counts["stored_share"])
    params = task.trainable_parameters()
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = int(cfg.epochs * steps_per_epoch)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.warmup_steps, total)
    step, elapsed, cpu, ckpt = 0, 0.0, 0.0, out / "checkpoint.pt"
    if ckpt.exists():
        step, elapsed, cpu = resume(ckpt, task, opt, sched, cfg)
        _trim_log(out / "metrics.jsonl", step)
    log = open(out / "metrics.jsonl", "a")
    task.train()
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"train {cfg.method.method}")
    t0, c0 = time.perf_counter() - elapsed, time.process_time() - cpu
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        idx = _batches_for_epoch(len(rows), cfg.batch_size, cfg.seed, epoch)[k]
        *inputs, labels = recipe.collate([epoch_rows(epoch)[i] for i in idx], pad, loaded.device)
        loss = recipe.loss(task(*inputs), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.log_every == 0 or step == 1:
            log.write(json.dumps({"step": step, "epoch": step / steps_per_epoch, "loss": loss.item(),
                                  "lr": sched.get_last_lr()[0], "time": time.perf_counter() - t0}) + "\n")
        if valid_rows and (step % cfg.eval_every == 0 or step == total):
            vl = validation_loss(task, valid_rows, cfg.batch_size * 2, pad)
            log.write(json.dumps({"step": step, "valid_loss": vl, "time": time.perf_counter() - t0}) + "\n")
        log.flush()
        if step % cfg.save_every == 0 or step == total:
            _save(ckpt, {"params": _trainable_state(task), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "step": step, "elapsed": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                         "rng": torch.get_rng_state(), "config": asdict(cfg)})
    bar.close()
    log.close()
    train_time = time.perf_counter() - t0
    task.eval()
    summary = {"config": asdict(cfg), "data": data.name, "model": loaded.name, "train_pairs": len(rows),
               "steps": step, "steps_per_epoch": steps_per_epoch, "train_seconds": train_time,
               "cpu_seconds": time.process_time() - c0,
               "seconds_per_epoch": train_time / max(step / steps_per_epoch, 1e-9), "machine": machine(), **counts}
    save_outputs(task, data, cfg, out, summary)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def resume(ckpt: Path, task: nn.Module, opt: torch.optim.Optimizer, sched, cfg: TrainConfig) -> tuple[int, float,
                                                                                                     float]:
    """Load a checkpoint into the task, optimiser, scheduler and RNG; returns (step, wall seconds, CPU seconds).
    Refuses a checkpoint written with other settings than those that only say when to log, validate and save."""
    state = torch.load(ckpt, map_location=task.loaded.device, weights_only=False)
    was, now = state.get("config"), asdict(cfg)
    if was is not None:
        changed = sorted(k for k in set(was) | set(now) if k not in RESUMABLE_CHANGES and was.get(k) != now.get(k))
        if changed:
            raise ValueError(f"{ckpt} was written with other settings ({', '.join(changed)}: "
                             f"{[was.get(k) for k in changed]} -> {[now.get(k) for k in changed]}); resume with "
                             "the same settings or use another --out")
    named = dict(task.named_parameters())
    for n, t in state["params"].items():
        named[n].data.copy_(t)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    logger.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"], state["elapsed"], state.get("cpu", 0.0)


def _save(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (a run killed while saving keeps the previous one)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after the checkpoint (they are run again)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def save_outputs(task: nn.Module, data: DataSplits, cfg: TrainConfig, out: Path, summary: dict) -> None:
    """Prefix methods: native artifact in out/prefix (and a PEFT adapter in out/peft for decoder-only models);
    LoRA: adapter; finetune: model."""
    if cfg.method.method in PREFIX_METHODS:
        art = make_artifact(task, data, summary)
        save_dir(art, out / "prefix")
        if recipe_for(task.loaded).peft_export:
            write_dir(export_peft(art, task.loaded.name), out / "peft")
    elif cfg.method.method == "lora":
        task.model.save_pretrained(out / "lora")
    else:
        task.model.save_pretrained(out / "model")


def make_artifact(task: nn.Module, data: DataSplits, summary: dict) -> PrefixArtifact:
    """The servable artifact for a prefix method, with the training recipe in the manifest."""
    tensors = task.prefix_tensors()
    c = summary["config"]
    desc = (f"{c['method']['method']} on {data.name} ({summary['train_pairs']} training pairs, {summary['steps']} "
            f"steps, batch {c['batch_size']}, lr {c['lr']}, prefix length {c['method']['prefix_length']}, "
            f"seed {c['seed']}) for {task.loaded.name}")
    extra = {k: summary[k] for k in ("steps", "train_pairs", "train_seconds", "trained_params", "stored_params")}
    return build_artifact(tensors.get("kv"), task.loaded.spec.fingerprint(), encoder_kv=tensors.get("encoder_kv"),
                          cross_kv=tensors.get("cross_kv"), positions=task.positions, description=desc,
                          source=f"trainer:{c['method']['method']}", input_format=data.input_format,
                          extra={"training": extra, "config": c})


def plot_losses(metrics_file: Path, png: Path) -> None:
    """Training and validation loss against step, as a PNG."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    with saved_figure(png, figsize=(6, 4)) as (_, ax):
        if tr:
            ax.plot(*zip(*tr), label="train")
        if va:
            ax.plot(*zip(*va), marker="o", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
