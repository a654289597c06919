"""`prefixserve train --push URL --task NAME` against the real server: the trained prefix is stored and served."""
from __future__ import annotations

import json

import torch

from basemodel.model import load_model
from tests.api.conftest import model_dir, start_server, stop_server  # noqa: F401 (fixture)
from prefixserve.cli import main as prefixserve_main
from trainer.cli import main
from trainer.evaluate import load_prefix
from trainer.generate import generate

ROWS = [{"input": f"name : N{i % 7} | food : F{i % 3}", "output": f"N{i % 7} serves F{i % 3} food."} for i in range(24)]
PROMPT = "name : N3 | food : F1\n"


def test_train_push_is_served(model_dir, tmp_path, capsys):  # noqa: F811 (fixture)
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    server = start_server(model_dir, tmp_path, max_new_tokens_default=8)
    try:
        assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--max-steps", "3", "--prefix-length", "4", "--mid-dim", "16", "--batch-size", "4",
                     "--lr", "0.05", "--push", server.url, "--task", "toy"]) == 0
        pushed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        with server.client() as c:
            info = c.get("/prefixes/toy")
            assert info.status_code == 200, info.text
            body = info.json()
            assert body["version"] == pushed["version"]
            assert body["manifest"]["input_format"].startswith("the text of the data file's input column")
            assert "prefix on toy" in body["manifest"]["description"]
            params = {"max_new_tokens": 8, "details": True, "ignore_eos_token": True}
            served = c.post("/generate", params={"task": "toy"}, json={"inputs": PROMPT, "parameters": params})
            bare = c.post("/generate", json={"inputs": PROMPT, "parameters": params})
        assert served.status_code == 200 and bare.status_code == 200, (served.text, bare.text)
    finally:
        stop_server(server)
    served_ids = [t["id"] for t in served.json()["details"]["tokens"]]
    # the trainer's own greedy decoding with the saved prefix, no stop tokens: the same token ids
    loaded = load_model(str(model_dir), dtype="float32")
    kv = load_prefix(tmp_path / "run", loaded)
    with torch.inference_mode():
        want = generate(loaded.model, loaded.tokenizer(PROMPT)["input_ids"], kv, set(), 1, 8)
    assert served_ids == want
    assert served_ids != [t["id"] for t in bare.json()["details"]["tokens"]]  # the prefix changed the output


def test_push_with_auth_on(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811 (fixture)
    """With auth on: no key is refused before training with the server's message; --api-key and
    PREFIXSERVE_API_KEY push; a refusal after training prints the server's message and where the prefix is."""
    from tests.api.test_tenants import make_key

    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    store = tmp_path / "store"
    key, small = make_key(str(store), "alice"), make_key(str(store), "tiny")
    server = start_server(model_dir, tmp_path, max_new_tokens_default=8)
    train = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "1", "--prefix-length", "4",
             "--mid-dim", "16", "--batch-size", "4", "--push", server.url, "--task", "toy"]
    monkeypatch.delenv("PREFIXSERVE_API_KEY", raising=False)
    try:
        assert main([*train, "--out", str(tmp_path / "nokey")]) == 2
        err = capsys.readouterr().err
        assert "cannot push" in err and "401 unauthorized" in err and "API key" in err and "Traceback" not in err
        assert not (tmp_path / "nokey").exists()  # refused before any training
        assert main([*train, "--out", str(tmp_path / "flag"), "--api-key", key]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "toy"
        monkeypatch.setenv("PREFIXSERVE_API_KEY", key)
        assert main([*train, "--out", str(tmp_path / "env"), "--task", "toy2"]) == 0
        with server.client(headers={"Authorization": f"Bearer {key}"}) as c:
            assert {p["task"] for p in c.get("/prefixes").json()["prefixes"]} == {"toy", "toy2"}
        assert prefixserve_main(["tenants", "set", "tiny", "--limit", "prefix_bytes=1", "--store", str(store)]) == 0
        monkeypatch.setenv("PREFIXSERVE_API_KEY", small)
        assert main([*train, "--out", str(tmp_path / "big")]) == 2  # trains, then the upload is over the quota
        err = capsys.readouterr().err
        assert "push failed" in err and "403 quota_exceeded" in err and "prefix_bytes" in err, err
        assert str(tmp_path / "big" / "prefix") in err and (tmp_path / "big" / "prefix" / "manifest.json").exists()
    finally:
        stop_server(server)



def test_train_lora_push_is_served(model_dir, tmp_path, capsys):  # noqa: F811 (fixture)
    """--method lora --push: the PEFT LoRA adapter the trainer saves is taken by the server, served with PEFT's
    own greedy ids; --method finetune cannot be pushed (refused before training)."""
    from peft import PeftModel

    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    server = start_server(model_dir, tmp_path, max_new_tokens_default=8)
    train = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
             "--lr", "0.05", "--push", server.url, "--task", "toy-lora"]
    try:
        assert main([*train, "--method", "finetune", "--out", str(tmp_path / "ft")]) == 2
        assert "finetune makes a whole model" in capsys.readouterr().err and not (tmp_path / "ft").exists()
        assert main([*train, "--method", "lora", "--out", str(tmp_path / "run")]) == 0
        pushed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert pushed["manifest"]["kind"] == "lora" and "lora on toy" in pushed["manifest"]["description"]
        params = {"max_new_tokens": 8, "details": True, "ignore_eos_token": True}
        with server.client() as c:
            served = c.post("/generate", params={"task": "toy-lora"}, json={"inputs": PROMPT, "parameters": params})
            bare = c.post("/generate", json={"inputs": PROMPT, "parameters": params})
        assert served.status_code == 200 and bare.status_code == 200, (served.text, bare.text)
    finally:
        stop_server(server)
    loaded = load_model(str(model_dir), dtype="float32")
    model = PeftModel.from_pretrained(loaded.model, str(tmp_path / "run" / "lora")).eval()
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    served_ids = [t["id"] for t in served.json()["details"]["tokens"]]
    assert served_ids == want
    assert served_ids != [t["id"] for t in bare.json()["details"]["tokens"]]  # the adapter changed the output
