"""Other Hugging Face causal-LM families go through the same engine: the spec table and the logits path."""
from __future__ import annotations

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from basemodel.model import LoadedModel, spec_from_config
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams


def _loaded(model) -> LoadedModel:
    model.eval()
    return LoadedModel(model, None, spec_from_config(model.config), model.config.model_type,
                       torch.device("cpu"), torch.float32)


def _engine_tokens(loaded, prompt, n, prefix=None):
    engine = Engine(loaded)
    hs = [engine.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), prefix),
          engine.submit(prompt[:2], SamplingParams(max_new_tokens=n, ignore_eos=True), None)]  # a batch-mate
    while not all(h.done for h in hs):
        engine.step()
    return engine, hs[0].wait(0).token_ids


def _hf_tokens(model, prompt, n):
    ids = torch.tensor([prompt])
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()


def test_gemma2_softcapped_logits_use_the_full_forward():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, max_position_embeddings=256, initializer_range=0.3,
                                           final_logit_softcapping=5.0, sliding_window=128))
    loaded = _loaded(model)
    engine, got = _engine_tokens(loaded, [5, 6, 7, 8, 9], 8)
    assert engine.runner.head is None  # soft-capping is detected: logits come from the model's own forward
    assert got == _hf_tokens(model, [5, 6, 7, 8, 9], 8)


def test_qwen2_with_a_prefix_uses_the_split_head_and_matches_peft():
    from peft import PeftModel, PrefixTuningConfig, get_peft_model
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.3)
    model = Qwen2ForCausalLM(cfg)
    loaded = _loaded(model)
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 1)
    emb = pm.get_prompt_embedding_to_save("default")  # [P, layers*2*kv_dim], PEFT's layout
    from prefix_store.peft_io import PeftAdapter, prefix_tuning_to_kv
    kv = prefix_tuning_to_kv(PeftAdapter("PREFIX_TUNING", {}, emb), loaded.spec.fingerprint())
    engine, got = _engine_tokens(loaded, [11, 12, 13], 8, DevicePrefix("v", kv))
    assert engine.runner.head is not None  # plain output embedding: the faster split path
    ref = pm.generate(input_ids=torch.tensor([[11, 12, 13]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                      max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    assert got == ref


def test_sliding_window_caps_the_context():
    cfg = Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       sliding_window=32)
    assert spec_from_config(cfg).max_positions == 32
    qwen = Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, sliding_window=32,
                       use_sliding_window=False)
    assert spec_from_config(qwen).max_positions == 256
