"""Shared pieces of the benchmarks: models, adapters, workloads, the matmul peak, FLOP counting."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from basemodel.model import LoadedModel, load_model, spec_from_config


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile of xs by nearest rank (p99 of 32 values is the largest); NaN for no values."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB (Linux /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) / 1024
    return out


def measure_matmul_peak(n: int = 2048, seconds: float = 3.0) -> float:
    """Best sustained fp32 FLOP/s of an n x n x n matmul on this machine (torch's own BLAS, all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def flops_per_token(model) -> int:
    """2 x the parameters a token's forward multiplies by: every weight matrix, the LM head included (also when
    it is tied to the input embedding); input embedding and position-embedding lookups are not multiplications and
    are excluded, as are attention-score FLOPs (small at these lengths)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head/embedding is counted once here
    lookups = emb.numel()
    for name, p in model.named_parameters():
        if name.endswith(("wpe.weight", "position_embeddings.weight", "embed_positions.weight")):
            lookups += p.numel()
    tied = head.data_ptr() == emb.data_ptr()
    return 2 * (total - lookups + (head.numel() if tied else 0))


def gpt2_small(seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """GPT-2 small's shape (124M parameters) with random weights; no pretrained GPT-2 is reachable here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False).to(dtype)
    return LoadedModel(model, None, spec_from_config(model.config), "gpt2-small-shape (random)",
                       torch.device("cpu"), dtype)


def bart_base_config(**over):
    """facebook/bart-base's shape (6+6 layers, d_model 768, 12 heads, vocabulary 50265, 140M parameters)."""
    from transformers import BartConfig

    d = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
             decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
             dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    d.update(over)
    return BartConfig(**d)


def bart_base(seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """bart-base's shape with random weights; no pretrained BART is reachable here."""
    from transformers import BartForConditionalGeneration

    torch.manual_seed(seed)
    model = BartForConditionalGeneration(bart_base_config()).eval().requires_grad_(False).to(dtype)
    return LoadedModel(model, None, spec_from_config(model.config), "bart-base shape (random)",
                       torch.device("cpu"), dtype)


def embedded(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (real weights)."""
    loaded = load_model("embedded", dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    loaded.name = "SmolLM2-135M-Instruct (embedded)"
    return loaded


def make_adapters(loaded: LoadedModel, n_tasks: int, out: Path, lengths: list[int]) -> list[Path]:
    """Save n_tasks PEFT prefix-tuning adapters with random weights for this model (seq2seq ones for BART)."""
    from peft import PrefixTuningConfig, get_peft_model

    task_type = "SEQ_2_SEQ_LM" if loaded.spec.is_encoder_decoder else "CAUSAL_LM"
    dirs = []
    for i in range(n_tasks):
        p = lengths[i % len(lengths)]
        pm = get_peft_model(loaded.model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=p))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for prm in pm.prompt_encoder.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
        d = out / f"task{i}"
        pm.save_pretrained(str(d))
        dirs.append(d)
    return dirs


@dataclass
class Job:
    """One request of the workload."""

    prompt: list[int]
    task: int


def workload(n_requests: int, n_tasks: int, vocab: int, prompt_len: int = 24, seed: int = 0) -> list[Job]:
    """n_requests prompts of prompt_len +- 4 random tokens, spread round-robin over n_tasks."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(n_requests):
        n = prompt_len + int(torch.randint(-4, 5, (1,), generator=g))
        jobs.append(Job(torch.randint(100, vocab - 100, (n,), generator=g).tolist(), i % n_tasks))
    return jobs
