"""Evaluation: decode one output per distinct input (greedy through the server's engine, or beam search) and score
it: the E2E metrics, TER, and for E2E the slot error rate."""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from basemodel.model import LoadedModel
from prefix_store.artifact import load_dir, validate
from server.engine.engine import Engine, EngineConfig
from server.engine.device_prefix import DevicePrefix
from server.engine.lora import DeviceLora
from server.engine.sampling import SamplingParams, phrase_spellings
from trainer.data import Example, group_references, prompt_for
from trainer.generate import generate_many, stop_token_ids
from trainer.metrics import corpus_ter, e2e_metrics
from trainer.seq2seq import Seq2SeqPrefix, generate_seq2seq_many
from trainer.slots import SlotReport, is_e2e_input, mr_phrases, slot_errors

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = ("Write one fluent English sentence (or two) that expresses all of the facts in the "
                       "structured input.")


# ModelSpec.is_encoder_decoder -> (decode many inputs, batched, what decoding takes from an artifact)
DECODERS = {
    False: (generate_many, lambda art: art.kv),  # the KV prefix [layers, 2, kv_heads, P, head_dim]
    True: (generate_seq2seq_many, Seq2SeqPrefix.from_artifact),  # BART: up to three tensors and their positions
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


def load_lora(path: str | Path, loaded: LoadedModel) -> DeviceLora:
    """A PEFT LoRA adapter directory as the engine serves it: a LoRA row beside the frozen (possibly quantised)
    weights, never merged; validated against the model as an upload is."""
    from basemodel.convert import artifact_from_files
    from prefix_store.peft_io import read_dir

    art = artifact_from_files(read_dir(path), loaded)
    return DeviceLora.from_artifact(art.manifest.sha256, art, loaded.device, loaded.dtype)


def engine_prefix(kv: torch.Tensor | Seq2SeqPrefix | DeviceLora | None) -> DevicePrefix | DeviceLora | None:
    """The task as the engine takes it (a prefix unpinned: nothing releases it to a cache)."""
    if kv is None or isinstance(kv, DeviceLora):
        return kv
    if isinstance(kv, Seq2SeqPrefix):
        t = kv.tensors
        return DevicePrefix("eval", t.get("kv"), encoder_kv=t.get("encoder_kv"), cross_kv=t.get("cross_kv"),
                            positions=kv.positions)
    return DevicePrefix("eval", kv)


def decode_greedy(loaded: LoadedModel, prompts: list[list[int]], kv: torch.Tensor | Seq2SeqPrefix | DeviceLora | None,
                  stops: set[int], max_new_tokens: int = 64, max_batch_size: int = 64,
                  progress: bool = True, must_include: list[list[list[str]]] | None = None) -> list[list[int]]:
    """Greedy outputs (stop token excluded) of every prompt, decoded by the server's engine in one continuously
    batched run: what a client sending these prompts with greedy settings would get. `must_include`: per prompt,
    the phrases (each a list of alternatives) the output must say before it may stop, as the API's parameter."""
    engine = Engine(loaded, EngineConfig(max_batch_size=max_batch_size, max_queue=max(len(prompts), 1)))
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=tuple(sorted(stops)))
    prefix = engine_prefix(kv)
    engine.start()
    try:
        per_prompt = [params] * len(prompts) if must_include is None else [
            replace(params, must_include=phrase_spellings(loaded.tokenizer, phrases)) for phrases in must_include]
        handles = [engine.submit(p, sp, prefix, loop=None) for p, sp in zip(prompts, per_prompt)]
        outs = []
        for h in tqdm(handles, disable=not progress, desc="decode greedy (engine)"):
            r = h.wait(None)  # no deadline: a paused (SIGSTOP) run resumes where it was
            if r.finish_reason == "error":
                raise RuntimeError(f"engine failed: {r.error}")
            ids = list(r.token_ids)
            outs.append(ids[:-1] if ids and (ids[-1] in stops or ids[-1] in engine.eos_token_ids) else ids)
    finally:
        engine.stop()
    return outs


def evaluate(loaded: LoadedModel, model: nn.Module, kv: torch.Tensor | Seq2SeqPrefix | DeviceLora | None,
             examples: list[Example], *,
             num_beams: int = 5, max_new_tokens: int = 64, max_inputs: int = 0, seed: int = 0,
             shots: list[Example] | None = None, instruction: str = "", out: str | Path | None = None,
             progress: bool = True, use_java: bool | None = None, max_batch_size: int = 64,
             must_include: bool = False) -> dict:
    """Decode and score (greedy through the engine; beam search batched: the beams of several inputs share each
    step, decoder-only or BART); writes predictions.jsonl and metrics.json into `out` when given. E2E inputs also
    get the slot error rate; groups of examples (WebNLG's seen / unseen categories) are also scored apart. `must_include` (greedy, E2E): each output must say a phrase
    for every attribute of its MR (`trainer.slots.mr_phrases`) before it may stop, the server's
    `parameters.must_include`."""
    tok = loaded.tokenizer
    stops = stop_token_ids(tok)
    decode = DECODERS[loaded.spec.is_encoder_decoder][0]
    inputs, refs = select_inputs(examples, max_inputs, seed)
    prompts = [tok(few_shot_prompt(instruction, shots or [], text) if instruction or shots else prompt_for(text))
               ["input_ids"] for text in inputs]
    if isinstance(model, nn.Module):  # the quantised model (QuantLlama) has no training mode
        model.eval()
    t0 = time.perf_counter()
    if must_include and (num_beams != 1 or model is not loaded.model or not all(map(is_e2e_input, inputs))):
        raise ValueError("must_include needs greedy decoding through the engine and E2E inputs")
    if num_beams == 1 and model is loaded.model:
        outs = decode_greedy(loaded, prompts, kv, stops, max_new_tokens, max_batch_size, progress,
                             [mr_phrases(i) for i in inputs] if must_include else None)
    else:  # the beams of max_batch_size // num_beams inputs share each step
        with tqdm(total=len(prompts), disable=not progress, desc=f"decode beam={num_beams} (batched)") as bar:
            outs = decode(model, prompts, kv, stops, num_beams, max_new_tokens,
                          batch_size=max(1, max_batch_size // num_beams), progress=bar.update)
    hyps = [tok.decode(ids, skip_special_tokens=True).strip() for ids in outs]
    decode_s = time.perf_counter() - t0
    result = {"metrics": score(inputs, hyps, refs, use_java), "inputs": len(inputs), "num_beams": num_beams,
              "max_new_tokens": max_new_tokens, "decode_seconds": decode_s, "seed": seed,
              "quantization": loaded.quantization, "must_include": must_include}
    slots = slot_errors(inputs, hyps) if all(is_e2e_input(i) for i in inputs) else None
    if slots is not None:
        result["slot_errors"] = slots.as_dict()
    group_of = {e.input: e.group for e in examples}
    for g in sorted({group_of[i] for i in inputs} - {""}):
        keep = [k for k, i in enumerate(inputs) if group_of[i] == g]
        result.setdefault("groups", {})[g] = {"inputs": len(keep), "metrics": score(
            [inputs[k] for k in keep], [hyps[k] for k in keep], [refs[k] for k in keep], use_java)}
    if out is not None:
        _write(Path(out), inputs, hyps, refs, slots, result)
    logger.info("scores on %d inputs: %s", len(inputs), result["metrics"])
    return result


def score(inputs: list[str], hyps: list[str], refs: list[list[str]], use_java: bool | None = None) -> dict:
    """The E2E metrics, and the slot error rate (SER) for E2E inputs or TER for any other data (WebNLG reports
    TER; on E2E's ~7 references per MR it costs over a minute of CPU and the challenge does not report it)."""
    scores = e2e_metrics(hyps, refs, use_java)
    if all(is_e2e_input(i) for i in inputs):
        scores["SER"] = slot_errors(inputs, hyps).total.rate
    else:
        scores["TER"] = corpus_ter(hyps, refs)
    return scores


def _write(o: Path, inputs: list[str], hyps: list[str], refs: list[list[str]], slots: SlotReport | None,
           result: dict) -> None:
    o.mkdir(parents=True, exist_ok=True)
    with open(o / "predictions.jsonl", "w") as f:
        for k, (text, h, r) in enumerate(zip(inputs, hyps, refs)):
            row = {"input": text, "output": h, "references": r}
            if slots is not None:
                row["slot_errors"] = slots.per_output[k]
            f.write(json.dumps(row) + "\n")
    (o / "metrics.json").write_text(json.dumps(result, indent=1))
