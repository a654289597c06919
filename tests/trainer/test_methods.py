"""Methods on tiny random models: frozen base, gradients only to the prefix, exact export, server parity."""
from __future__ import annotations

import pytest
import torch

from basemodel.convert import artifact_from_files, prompt_tuning_to_kv
from prefix_store.artifact import build_artifact, validate
from prefix_store.peft_io import export_peft
from trainer.generate import generate
from trainer.loop import collate, encode, lm_loss
from trainer.data import Example
from trainer.methods import MethodConfig, TaskModel, forward_with_prefix

EXAMPLES = [Example(f"name : N{i} | food : F{i % 3}", f"N{i} serves F{i % 3} food.") for i in range(6)]


def _batch(loaded):
    return collate(encode(loaded.tokenizer, EXAMPLES, 64), loaded.tokenizer.eos_token_id, "cpu")


def _train(task, loaded, steps=8, lr=1e-2):
    ids, mask, labels = _batch(loaded)
    opt = torch.optim.Adam(task.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(task(ids, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prefix", "prefix-direct", "prompt"])
def test_frozen_base_and_loss_goes_down(make_model, kind, method):
    loaded = make_model(kind)
    before = {n: p.clone() for n, p in loaded.model.state_dict().items()}
    task = TaskModel(loaded, MethodConfig(method=method, prefix_length=4, mid_dim=16))
    task.train()
    ids, mask, labels = _batch(loaded)
    lm_loss(task(ids, mask), labels).backward()
    assert all(p.grad is None for p in loaded.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.trainable_parameters())
    assert {id(p) for p in task.trainable_parameters()}.isdisjoint({id(p) for p in loaded.model.parameters()})
    losses = _train(task, loaded, lr=3e-2)
    assert losses[-1] < losses[0] - 0.01, losses  # tiny random models are near-uniform: small but real drop
    after = loaded.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # bit-identical base weights


def test_saved_prefix_is_what_the_mlp_produced(make_model):
    loaded = make_model("llama")
    task = TaskModel(loaded, MethodConfig(method="prefix", prefix_length=3, mid_dim=8, dropout=0.3))
    _train(task, loaded, steps=2)
    enc, s = task.encoder, loaded.spec
    flat = enc.mlp(enc.embedding.weight).detach()  # [P, layers*2*kv_dim]
    want = flat.view(3, s.num_layers, 2, s.num_kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
    kv = task.prefix_kv()
    assert torch.equal(kv, want) and kv.shape == (s.num_layers, 2, s.num_kv_heads, 3, s.head_dim)
    # PEFT's layout of the same prefix is exactly the MLP output
    files = export_peft(build_artifact(kv, s.fingerprint()))
    from safetensors.torch import load
    assert torch.equal(load(files["adapter_model.safetensors"])["prompt_embeddings"], flat)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_artifact_round_trips_into_the_server(make_model, method):
    loaded = make_model("llama")
    task = TaskModel(loaded, MethodConfig(method=method, prefix_length=4, mid_dim=16))
    _train(task, loaded, steps=2)
    art = build_artifact(task.prefix_kv(), loaded.spec.fingerprint(), input_format="fmt")
    manifest, tensors = art.to_bytes()
    native = artifact_from_files({"manifest.json": manifest, "prefix.safetensors": tensors}, loaded)
    peft = artifact_from_files(export_peft(art), loaded)
    validate(native, loaded.spec.fingerprint())
    assert torch.equal(native.kv, art.kv) and torch.equal(peft.kv, art.kv)
    assert native.manifest.input_format == "fmt"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prompt_tuning_served_as_kv_matches_training_forward(make_model, kind):
    loaded = make_model(kind)
    task = TaskModel(loaded, MethodConfig(method="prompt", prefix_length=4))
    ids, mask, _ = _batch(loaded)
    with torch.no_grad():
        trained = task(ids, mask)
        served = forward_with_prefix(loaded.model, prompt_tuning_to_kv(loaded, task.encoder.embeddings), ids, mask)
    assert torch.allclose(trained, served, atol=1e-4)


def test_prefix_matches_peft_prefix_tuning(make_model):
    from peft import PrefixTuningConfig, get_peft_model

    loaded = make_model("llama")
    task = TaskModel(loaded, MethodConfig(method="prefix-direct", prefix_length=4))
    ids, mask, _ = _batch(loaded)
    with torch.no_grad():
        ours = task(ids, mask)
        peft = get_peft_model(loaded.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        peft.prompt_encoder["default"].embedding.weight.copy_(task.encoder.flat())
        theirs = peft(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_weight_methods_train_the_model(make_model):
    lora = TaskModel(make_model("llama"), MethodConfig(method="lora", lora_r=2))
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    assert lora.prefix_kv() is None
    loaded = make_model("gpt2")
    full = TaskModel(loaded, MethodConfig(method="finetune"))
    assert len(full.trainable_parameters()) == len(list(loaded.model.parameters()))
    assert _train(full, loaded, steps=4, lr=1e-3)[-1] < 10.5


def test_greedy_and_beam_with_prefix(make_model):
    loaded = make_model("llama")
    task = TaskModel(loaded, MethodConfig(method="prefix", prefix_length=4, mid_dim=16))
    _train(task, loaded, steps=30, lr=3e-2)
    kv, model, tok = task.prefix_kv(), loaded.model, loaded.tokenizer
    prompt = tok("name : N1 | food : F1\n")["input_ids"]
    greedy = generate(model, prompt, kv, {tok.eos_token_id}, num_beams=1, max_new_tokens=8)
    # reference: recompute the whole sequence each step, argmax of the last position
    seq = list(prompt)
    for _ in range(len(greedy)):
        x = torch.tensor([seq])
        with torch.no_grad():
            seq.append(int(forward_with_prefix(model, kv, x, torch.ones_like(x))[0, -1].argmax()))
    assert greedy == seq[len(prompt):]
    beam = generate(model, prompt, kv, {tok.eos_token_id}, num_beams=3, max_new_tokens=8)
    assert 0 < len(beam) <= 8
