"""Evaluation: decode one output per distinct input (greedy or beam search) and score it with the E2E metrics."""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from basemodel.model import LoadedModel
from prefix_store.artifact import load_dir, validate
from trainer.data import Example, group_references, prompt_for
from trainer.generate import generate, stop_token_ids
from trainer.metrics import e2e_metrics
from trainer.seq2seq import Seq2SeqPrefix, generate_seq2seq

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = ("Write one fluent English sentence (or two) that expresses all of the facts in the "
                       "structured input.")


# ModelSpec.is_encoder_decoder -> (decode one input, what decoding takes from an artifact)
DECODERS = {
    False: (generate, lambda art: art.kv),  # the KV prefix [layers, 2, kv_heads, P, head_dim]
    True: (generate_seq2seq, Seq2SeqPrefix.from_artifact),  # BART: up to three tensors and their positions
}


def load_prefix(path: str | Path, loaded: LoadedModel) -> torch.Tensor | Seq2SeqPrefix:
    """The validated prefix from an artifact directory (or a training run directory holding prefix/), as this
    model kind's decoding takes it: the `kv` tensor (decoder-only) or a `Seq2SeqPrefix` (BART)."""
    p = Path(path)
    if (p / "prefix").is_dir():
        p = p / "prefix"
    art = load_dir(p)
    validate(art, loaded.spec.fingerprint())
    return DECODERS[loaded.spec.is_encoder_decoder][1](art)


def few_shot_prompt(instruction: str, shots: list[Example], text: str) -> str:
    """The prompt for the untuned model: a task description, k solved examples, then the input."""
    head = f"{instruction}\n\n" if instruction else ""
    return head + "".join(prompt_for(e.input) + e.output + "\n\n" for e in shots) + prompt_for(text)


def select_inputs(examples: list[Example], max_inputs: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """Distinct inputs with grouped references; a seeded random subset of `max_inputs` of them when > 0."""
    inputs, refs = group_references(examples)
    if 0 < max_inputs < len(inputs):
        keep = sorted(random.Random(seed).sample(range(len(inputs)), max_inputs))
        inputs, refs = [inputs[i] for i in keep], [refs[i] for i in keep]
    return inputs, refs


def evaluate(loaded: LoadedModel, model: nn.Module, kv: torch.Tensor | Seq2SeqPrefix | None,
             examples: list[Example], *,
             num_beams: int = 5, max_new_tokens: int = 64, max_inputs: int = 0, seed: int = 0,
             shots: list[Example] | None = None, instruction: str = "", out: str | Path | None = None,
             progress: bool = True, use_java: bool | None = None) -> dict:
    """Decode and score; writes predictions.jsonl and metrics.json into `out` when given."""
    tok = loaded.tokenizer
    stops = stop_token_ids(tok)
    decode = DECODERS[loaded.spec.is_encoder_decoder][0]
    inputs, refs = select_inputs(examples, max_inputs, seed)
    model.eval()
    hyps, t0 = [], time.perf_counter()
    for text in tqdm(inputs, disable=not progress, desc=f"decode beam={num_beams}"):
        prompt = few_shot_prompt(instruction, shots or [], text) if instruction or shots else prompt_for(text)
        ids = decode(model, tok(prompt)["input_ids"], kv, stops, num_beams, max_new_tokens)
        hyps.append(tok.decode(ids, skip_special_tokens=True).strip())
    decode_s = time.perf_counter() - t0
    scores = e2e_metrics(hyps, refs, use_java)
    result = {"metrics": scores, "inputs": len(inputs), "num_beams": num_beams, "max_new_tokens": max_new_tokens,
              "decode_seconds": decode_s, "seed": seed}
    if out is not None:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        with open(o / "predictions.jsonl", "w") as f:
            for text, h, r in zip(inputs, hyps, refs):
                f.write(json.dumps({"input": text, "output": h, "references": r}) + "\n")
        (o / "metrics.json").write_text(json.dumps(result, indent=1))
    logger.info("scores on %d inputs: %s", len(inputs), scores)
    return result
