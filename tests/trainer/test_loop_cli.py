"""The training loop (logs, plot, resumable checkpoints, artifact) and the CLI, on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

import trainer.loop as loop
from server.engine import kernels
from prefix_store.artifact import load_dir, validate
from trainer.data import DataSplits, Example
from trainer.methods import MethodConfig
from tests.tiny import save_lora_adapter, save_tiny_model_dir

EX = [Example(f"name : N{i % 7} | food : F{i % 3}", f"N{i % 7} serves F{i % 3} food.") for i in range(30)]
DATA = DataSplits(EX[:24], EX[24:], EX[24:], "toy format", "toy")


def _cfg(**kw):
    kw = {"lr": 1e-2, "max_steps": 6, "batch_size": 4, "eval_every": 3, "save_every": 2, "log_every": 1, **kw}
    return loop.TrainConfig(method=MethodConfig(method="prefix", prefix_length=3, mid_dim=8), **kw)


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
    assert result["inputs"] == 1 and set(result["metrics"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr",
                                                                    "SER"}
    assert len((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()) == 1


def test_resume_refuses_other_settings_and_keeps_one_log_line_per_step(make_model, tmp_path):
    loop.train(make_model("llama"), DATA, _cfg(max_valid=0), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="lr"):
        loop.train(make_model("llama"), DATA, _cfg(max_valid=0, lr=0.5), tmp_path / "r", progress=False)
    # when to log / save may change; a resumed run re-logs the steps after its checkpoint once
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    ckpt["step"] = 4
    torch.save(ckpt, tmp_path / "r" / "checkpoint.pt")
    s = loop.train(make_model("llama"), DATA, _cfg(max_valid=0, save_every=3), tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert s["machine"]["cpu"] and s["cpu_seconds"] > 0


E2E_EX = [Example(f"name : N{i % 5} | Type : coffee shop | food : {'English' if i % 2 else 'Chinese'} | "
                  f"area : riverside", f"N{i % 5} is a coffee shop serving {'English' if i % 2 else 'Chinese'} food"
                  + (" by the river." if i % 3 else ".")) for i in range(24)]


def test_fix_mrs_and_swap_values_change_what_is_trained_on(make_model, tmp_path):
    data = DataSplits(E2E_EX[:20], E2E_EX[20:], E2E_EX[20:], "e2e", "e2e")
    cfg = _cfg(fix_mrs=True, swap_values=True)
    train_ex, valid_ex = loop.training_examples(data, cfg)
    assert sum("area" in e.input for e in train_ex) == sum(bool(i % 3) for i in range(20))
    rows = loop.EpochRows(loop.recipe_for(make_model("llama")), make_model("llama").tokenizer, train_ex, cfg)
    assert rows(0) != rows(1) and rows(1) == rows(1)  # drawn anew each epoch, once per epoch
    assert loop.train(make_model("llama"), data, cfg, tmp_path / "e", progress=False)["steps"] == 6
    triples = [Example("Alan Bean : occupation : Test pilot", "Alan Bean was a test pilot.")] * 4
    with pytest.raises(ValueError, match="E2E"):
        loop.training_examples(DataSplits(triples, triples, triples, "webnlg", "webnlg"), _cfg(swap_values=True))


@pytest.mark.skipif(bool(kernels.missing_cpu_flags()), reason="the CPU lacks AVX2/FMA/F16C")
def test_cli_evaluate_decodes_as_the_quantised_server(tmp_path):
    from server.engine.quant_runner import load_quantized
    from trainer.cli import main
    from trainer.data import prompt_for
    from trainer.evaluate import decode_greedy, load_lora, load_prefix
    from trainer.generate import stop_token_ids

    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"input": e.input, "output": e.output}) for e in EX))
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--prefix-length", "2", "--mid-dim", "8", "--batch-size", "4"]) == 0
    threads = torch.get_num_threads()
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--split", "valid", "--prefix",
                 str(tmp_path / "run"), "--beams", "1", "--quantization", "q4", "--max-new-tokens", "6",
                 "--max-batch-size", "3", "--out", str(tmp_path / "ev")]) == 0
    assert torch.get_num_threads() == threads  # the kernels' setting does not outlive the evaluation
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert result["quantization"] == "q4" and result["inputs"] == len(rows) >= 1
    # each output is what the quantised engine decodes for that input alone
    q4 = load_quantized(str(model_dir))
    kv, stops = load_prefix(tmp_path / "run", q4), stop_token_ids(q4.tokenizer)
    for row in rows:
        ids = q4.tokenizer(prompt_for(row["input"]))["input_ids"]
        with torch.inference_mode():  # as the CLI decodes
            alone = decode_greedy(q4, [ids], kv, stops, 6, max_batch_size=1, progress=False)[0]
        assert row["output"] == q4.tokenizer.decode(alone, skip_special_tokens=True).strip()
    with pytest.raises(SystemExit, match="greedily"):
        main(["evaluate", "--model", str(model_dir), "--data", str(data), "--prefix", str(tmp_path / "run"),
              "--quantization", "q4", "--beams", "2"])
    # a LoRA adapter: decoded as the quantised server serves it, a LoRA row beside the 4-bit weights
    lora = save_lora_adapter("llama", tmp_path / "lora", r=4, seed=3)
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--split", "valid", "--lora",
                 str(lora), "--beams", "1", "--quantization", "q4", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "ev-lora")]) == 0
    lrows = [json.loads(line) for line in (tmp_path / "ev-lora" / "predictions.jsonl").read_text().splitlines()]
    row_lora, outs = load_lora(lora, q4), []
    for row in lrows:
        ids = q4.tokenizer(prompt_for(row["input"]))["input_ids"]
        alone = decode_greedy(q4, [ids], row_lora, stops, 6, max_batch_size=1, progress=False)[0]
        bare = decode_greedy(q4, [ids], None, stops, 6, max_batch_size=1, progress=False)[0]
        assert row["output"] == q4.tokenizer.decode(alone, skip_special_tokens=True).strip()
        outs.append(alone != bare)
    assert any(outs)  # the adapter changes what the model says
    with pytest.raises(SystemExit, match="--finetuned"):
        main(["evaluate", "--model", str(model_dir), "--data", str(data), "--finetuned", str(model_dir),
              "--quantization", "q4", "--beams", "1"])
