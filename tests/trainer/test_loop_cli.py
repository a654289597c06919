"""The training loop (logs, plot, resumable checkpoints, artifact) and the CLI, on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

import trainer.loop as loop
from prefix_store.artifact import load_dir, validate
from trainer.data import DataSplits, Example
from trainer.methods import MethodConfig

EX = [Example(f"name : N{i % 7} | food : F{i % 3}", f"N{i % 7} serves F{i % 3} food.") for i in range(30)]
DATA = DataSplits(EX[:24], EX[24:], EX[24:], "toy format", "toy")


def _cfg(**kw):
    return loop.TrainConfig(method=MethodConfig(method="prefix", prefix_length=3, mid_dim=8), lr=1e-2,
                            max_steps=6, batch_size=4, eval_every=3, save_every=2, log_every=1, **kw)


def test_train_writes_everything_and_resumes_identically(make_model, tmp_path, monkeypatch):
    full = loop.train(make_model("llama"), DATA, _cfg(), tmp_path / "a", progress=False)
    assert full["steps"] == 6 and full["stored_params"] < full["trained_params"]
    for name in ("metrics.jsonl", "loss.png", "summary.json", "checkpoint.pt", "prefix/manifest.json",
                 "peft/adapter_config.json"):
        assert (tmp_path / "a" / name).exists(), name
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_loss" in r for r in rows) and all("loss" in r or "valid_loss" in r for r in rows)
    loaded = make_model("llama")
    art = load_dir(tmp_path / "a" / "prefix")
    validate(art, loaded.spec.fingerprint())
    assert art.manifest.input_format == "toy format" and "prefix on toy" in art.manifest.description

    # interrupted after 5 steps (checkpoint at step 4), then resumed: the same prefix as the uninterrupted run
    calls, real = {"n": 0}, loop.lm_loss

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(loop, "lm_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        loop.train(make_model("llama"), DATA, _cfg(max_valid=0), tmp_path / "b", progress=False)
    monkeypatch.setattr(loop, "lm_loss", real)
    loop.train(make_model("llama"), DATA, _cfg(max_valid=0), tmp_path / "b", progress=False)
    assert torch.equal(load_dir(tmp_path / "b" / "prefix").kv, art.kv)


def test_cli_train_and_evaluate(make_model, tmp_path, capsys):
    from trainer.cli import main

    loaded = make_model("gpt2")
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"input": e.input, "output": e.output}) for e in EX))
    assert main(["train", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--prefix-length", "2", "--mid-dim", "8", "--batch-size", "4"]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--split", "valid",
                 "--prefix", str(tmp_path / "run"), "--beams", "2", "--max-new-tokens", "4", "--max-inputs", "1",
                 "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert result["inputs"] == 1 and set(result["metrics"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert len((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()) == 1
