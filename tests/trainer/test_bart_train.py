"""BART training on a tiny random model: the three reparametrised prefixes, fine-tuning, the E2E loop through the
CLI, the saved format-2 artifact, and decoding with it (reference greedy, evaluation greedy and beam search)."""
from __future__ import annotations

import json

import pytest
import torch

from basemodel.model import load_model
from prefix_store.artifact import load_dir, validate
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig
from server.engine.sampling import SamplingParams
from tests.tiny import save_tiny_model_dir
from trainer.bart_prefix import greedy_generate, prefix_logits
from trainer.data import Example
from trainer.evaluate import decode_greedy
from trainer.generate import stop_token_ids
from trainer.methods import MethodConfig
from trainer.seq2seq import (Seq2SeqPrefix, Seq2SeqSteps, Seq2SeqTaskModel, collate_seq2seq, encode_seq2seq,
                             generate_seq2seq, generate_seq2seq_many, seq2seq_loss)

EXAMPLES = [Example(f"name : N{i} | food : F{i % 3}", f"N{i} serves F{i % 3} food.") for i in range(6)]


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    """A tiny random BART directory (tests/tiny.py's shape, BART tokenizer) loaded the way the CLI loads it."""
    return save_tiny_model_dir("bart", tmp_path_factory.mktemp("bart") / "m")


def _loaded(bart_dir):
    return load_model(str(bart_dir), dtype="float32")


def _batch(loaded):
    return collate_seq2seq(encode_seq2seq(loaded.tokenizer, EXAMPLES, 64), loaded.tokenizer.pad_token_id, "cpu")


def _train(task, loaded, steps: int, lr: float) -> list[float]:
    ids, mask, dec, labels = _batch(loaded)
    opt = torch.optim.Adam(task.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = seq2seq_loss(task(ids, mask, dec), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_batches_follow_the_hf_bart_recipe(bart_dir):
    tok = _loaded(bart_dir).tokenizer
    (src, dec, labels), = encode_seq2seq(tok, EXAMPLES[:1], 64)
    assert src == tok("name : N0 | food : F0\n")["input_ids"] and src[0] == tok.bos_token_id
    assert labels == tok("N0 serves F0 food.")["input_ids"] and labels[-1] == tok.eos_token_id
    assert dec == [tok.eos_token_id] + labels[:-1]  # shifted right behind decoder_start_token_id (</s>)
    ids, mask, dec_t, lab_t = collate_seq2seq(encode_seq2seq(tok, EXAMPLES[:2] + [Example("x", "y")], 64), 1, "cpu")
    assert ids.shape[0] == 3 and mask[2].sum() == len(tok("x\n")["input_ids"]) and (lab_t[2] == -100).sum() > 0


def test_three_prefixes_train_alone_and_save_what_the_mlps_produce(bart_dir):
    loaded = _loaded(bart_dir)
    before = {n: p.clone() for n, p in loaded.model.state_dict().items()}
    cfg = MethodConfig(method="prefix", prefix_length=3, encoder_prefix_length=4, cross_prefix_length=2, mid_dim=16,
                       dropout=0.2)
    task = Seq2SeqTaskModel(loaded, cfg)
    task.train()
    ids, mask, dec, labels = _batch(loaded)
    seq2seq_loss(task(ids, mask, dec), labels).backward()
    assert all(p.grad is None for p in loaded.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.trainable_parameters())
    losses = _train(task, loaded, 8, 1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(before[n], t) for n, t in loaded.model.state_dict().items())  # bit-identical base
    c, saved = loaded.model.config, task.prefix_tensors()
    shapes = {"encoder_kv": (c.encoder_layers, c.encoder_attention_heads, 4), "kv": (c.decoder_layers,
              c.decoder_attention_heads, 3), "cross_kv": (c.decoder_layers, c.decoder_attention_heads, 2)}
    for name, (layers, heads, p) in shapes.items():
        enc = task.prefixes[name]
        flat = enc.mlp(enc.embedding.weight).detach()  # [P, layers*2*kv_dim]: Embedding -> Linear -> Tanh -> Linear
        assert enc.embedding.weight.shape[1] == c.d_model and enc.mlp[0].out_features == 16
        want = flat.view(p, layers, 2, heads, c.d_model // heads).permute(1, 2, 3, 0, 4)
        assert torch.equal(saved[name], want), name
    # training logits are the reference forward with the saved tensors (dropout off in eval mode)
    task.eval()
    torch.testing.assert_close(task(ids, mask, dec), prefix_logits(loaded.model, ids, mask, dec, saved, "from_zero"))


@pytest.mark.parametrize("name", ["encoder_kv", "kv", "cross_kv"])
def test_a_prefix_of_length_zero_is_left_out(bart_dir, name):
    loaded = _loaded(bart_dir)
    lengths = {"encoder_prefix_length": 0, "prefix_length": 0, "cross_prefix_length": 0}
    lengths[{"encoder_kv": "encoder_prefix_length", "kv": "prefix_length", "cross_kv": "cross_prefix_length"}[name]] = 2
    task = Seq2SeqTaskModel(loaded, MethodConfig(method="prefix-direct", **lengths))
    tensors = task.prefix_tensors()
    assert list(tensors) == [name] and tensors[name].shape[3] == 2


def test_unsupported_settings_are_named(bart_dir):
    loaded = _loaded(bart_dir)
    with pytest.raises(ValueError, match="'prompt' is not available"):
        Seq2SeqTaskModel(loaded, MethodConfig(method="prompt"))
    with pytest.raises(ValueError, match="--init words"):
        Seq2SeqTaskModel(loaded, MethodConfig(init="words"))
    with pytest.raises(ValueError, match="at least one"):
        Seq2SeqTaskModel(loaded, MethodConfig(prefix_length=0, encoder_prefix_length=0, cross_prefix_length=0))
    loaded.model.generation_config.decoder_start_token_id = 0
    with pytest.raises(ValueError, match="decoder_start_token_id 0"):
        Seq2SeqTaskModel(loaded, MethodConfig())


def test_finetune_trains_every_weight(bart_dir):
    loaded = _loaded(bart_dir)
    task = Seq2SeqTaskModel(loaded, MethodConfig(method="finetune"))
    assert task.prefix_tensors() is None
    assert len(task.trainable_parameters()) == len(list(loaded.model.parameters()))
    before = loaded.model.lm_head.weight.clone()
    losses = _train(task, loaded, 4, 1e-3)
    assert losses[-1] < losses[0] and not torch.equal(before, loaded.model.lm_head.weight)


def test_beam_steps_reorder_caches_and_encoder_states(bart_dir):
    loaded = _loaded(bart_dir)
    model = loaded.model
    g = torch.Generator().manual_seed(0)
    c = model.config
    enc_hd, dec_hd = c.d_model // c.encoder_attention_heads, c.d_model // c.decoder_attention_heads
    pre = {"encoder_kv": torch.randn(c.encoder_layers, 2, c.encoder_attention_heads, 2, enc_hd, generator=g),
           "cross_kv": torch.randn(c.decoder_layers, 2, c.decoder_attention_heads, 3, dec_hd, generator=g)}
    src = loaded.tokenizer("name : N1 | food : F1\n")["input_ids"]
    from trainer.bart_prefix import apply_prefixes

    def full(seq):  # log-probs of the next token by recomputing everything
        logits = prefix_logits(model, torch.tensor([src]), None, torch.tensor([seq]), pre, "from_zero")[0, -1]
        return torch.log_softmax(logits.float(), -1)

    with torch.no_grad(), apply_prefixes(model, pre, "from_zero"):
        steps = Seq2SeqSteps(model, [src])
        torch.testing.assert_close(steps.start_logp()[0], full([2]))
        steps.reorder(torch.tensor([0, 0, 0]))
        got = steps.step([5, 6, 7])
        steps.reorder(torch.tensor([2, 0]))
        got2 = steps.step([8, 9])
    for row, tok in enumerate([5, 6, 7]):
        torch.testing.assert_close(got[row], full([2, tok]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got2[0], full([2, 7, 8]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got2[1], full([2, 5, 9]), atol=1e-5, rtol=0)


def test_batched_beam_search_equals_one_input_at_a_time(bart_dir):
    """generate_seq2seq_many shares each decoder step between the beams of several inputs (right-padded, masked
    encoder inputs): every input's output is the one generate_seq2seq gives it alone, for any batch size."""
    loaded = _loaded(bart_dir)
    model, c, g = loaded.model.eval(), loaded.model.config, torch.Generator().manual_seed(1)
    enc_hd, dec_hd = c.d_model // c.encoder_attention_heads, c.d_model // c.decoder_attention_heads
    prefix = Seq2SeqPrefix({"encoder_kv": torch.randn(c.encoder_layers, 2, c.encoder_attention_heads, 2, enc_hd,
                                                      generator=g),
                            "cross_kv": torch.randn(c.decoder_layers, 2, c.decoder_attention_heads, 3, dec_hd,
                                                    generator=g)}, "from_zero")
    srcs = [loaded.tokenizer(t)["input_ids"] for t in ("name : N1 | food : F1\n", "x\n",
                                                        "a longer input than the others, with more words in it\n",
                                                        "name : B\n", "the fifth\n")]
    for pre in (None, prefix):
        free = [generate_seq2seq(model, q, pre, set(), 1, 10) for q in srcs]
        stops = {free[0][3], free[2][5]} | set(range(0, len(loaded.tokenizer), 2))  # inputs finish apart
        for beams in (1, 3):
            alone = [generate_seq2seq(model, q, pre, stops, beams, 10) for q in srcs]
            assert len({len(a) for a in alone}) > 1, (free, alone)
            for batch_size in (1, 2, 5):
                done = []
                got = generate_seq2seq_many(model, srcs, pre, stops, beams, 10, batch_size=batch_size,
                                            progress=done.append)
                assert got == alone, (pre is None, beams, batch_size)
                assert sum(done) == len(srcs)


def test_e2e_run_through_the_cli_trains_saves_and_decodes(bart_dir, tmp_path, capsys, monkeypatch):
    from trainer.cli import main

    run = tmp_path / "run"
    assert main(["train", "--method", "prefix", "--model", str(bart_dir), "--data", "e2e", "--out", str(run),
                 "--max-train", "16", "--epochs", "10", "--max-steps", "20", "--batch-size", "4", "--lr", "2e-2",
                 "--prefix-length",
                 "3", "--encoder-prefix-length", "4", "--cross-prefix-length", "2", "--mid-dim", "32",
                 "--max-valid", "4", "--log-every", "1", "--eval-every", "1000", "--save-every", "1000"]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    loaded = _loaded(bart_dir)
    art = load_dir(run / "prefix")
    validate(art, loaded.spec.fingerprint())
    m = art.manifest
    assert (m.prefix_length, m.encoder_prefix_length, m.cross_prefix_length, m.positions) == (3, 4, 2, "from_zero")
    assert m.format_version == 2 and m.input_format.startswith("E2E meaning representation")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stored_params"] == sum(t.numel() for t in art.tensors.values()) < summary["trained_params"]
    assert not (run / "peft").exists() and (run / "loss.png").exists()

    # the engine-free reference runs with it; evaluation's greedy decoding is the same ids (stop token excluded)
    src = loaded.tokenizer("name : The Eagle | Type : coffee shop\n")["input_ids"]
    with torch.no_grad():
        ref = greedy_generate(loaded.model, src, art.tensors, m.positions, max_new_tokens=12)
        bare = greedy_generate(loaded.model, src, None, max_new_tokens=12)
    ours = generate_seq2seq(loaded.model, src, Seq2SeqPrefix.from_artifact(art), {loaded.tokenizer.eos_token_id}, 1, 12)
    assert ours == [t for t in ref if t != loaded.tokenizer.eos_token_id] and ref != bare
    assert len(generate_seq2seq(loaded.model, src, Seq2SeqPrefix.from_artifact(art),
                                stop_token_ids(loaded.tokenizer), 3, 12)) <= 12
    # ... and the engine serves the trained artifact with the same greedy ids
    engine = Engine(loaded, EngineConfig(max_batch_size=2))
    handle = engine.submit(src, SamplingParams(max_new_tokens=12),
                           DevicePrefix.from_artifact("e2e", art, loaded.device, loaded.dtype))
    while not handle.done:
        engine.step()
    assert handle.wait(0).token_ids == ref
    # evaluation's batched greedy path (the engine again, with the artifact as evaluation loads it)
    eos = {loaded.tokenizer.eos_token_id}
    assert decode_greedy(loaded, [src, src[:4]], Seq2SeqPrefix.from_artifact(art), eos, 12, progress=False) == [
        ours, generate_seq2seq(loaded.model, src[:4], Seq2SeqPrefix.from_artifact(art), eos, 1, 12)]

    # scoring is covered by test_metrics; here the Python tokeniser path spares two JVM start-ups
    monkeypatch.setattr("trainer.metrics.java_available", lambda: False)
    assert main(["evaluate", "--model", str(bart_dir), "--data", "e2e", "--prefix", str(run), "--beams", "2",
                 "--max-new-tokens", "6", "--max-inputs", "2", "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert result["inputs"] == 2 and set(result["metrics"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr",
                                                                    "SER"}
