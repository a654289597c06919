"""The `prefixserve` command line as a new user meets it: `serve --help` shows every default, `list` prints a
table (and JSON lines with --json), `export-peft` writes an adapter that PEFT loads from its own config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefixserve.cli import build_parser, main
from server.settings import Settings
from tests.api.conftest import peft_adapter


def test_serve_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--max-batch-size MAX_BATCH_SIZE Rows in the running batch (default: 32; env PREFIXSERVE_MAX_BATCH_SIZE)" \
        in shown
    for name, f in Settings.model_fields.items():
        if f.default is not None or f.default_factory is not None:
            value = f.default_factory() if f.default_factory else f.default
            assert f"default: {value!r}" if value == "" else f"default: {value}" in shown, name
        assert f"env PREFIXSERVE_{name.upper()}" in shown, name


@pytest.fixture(scope="module")
def stored(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A store holding one task imported from a PEFT adapter of the tiny model, and that adapter's directory."""
    work = tmp_path_factory.mktemp("cli")
    adapter = work / "adapter"
    adapter.mkdir()
    for name, data in peft_adapter(seed=7).items():
        (adapter / name).write_bytes(data)
    store = work / "store"
    assert main(["import-peft", str(adapter), "--task", "table-task", "--model", str(model_dir), "--store",
                 str(store), "--description", "a test prefix"]) == 0
    return store, adapter


def test_list_is_a_table_and_json_lines(stored, capsys):
    store, _ = stored
    capsys.readouterr()
    assert main(["list", "--store", str(store)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["TASK", "VERSION", "SOURCE", "TOKENS", "SIZE", "DESCRIPTION"]
    assert row.split()[:3] == ["table-task", row.split()[1], "peft:prefix_tuning"] and len(row.split()[1]) == 12
    assert row.split()[3] == "4" and row.endswith("a test prefix")
    assert row.index("table-task") == header.index("TASK") and row.index("4 ") >= header.index("TOKENS")
    assert main(["list", "--store", str(store), "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    item = json.loads(line)
    assert item["task"] == "table-task" and len(item["version"]) == 64 and item["prefix_length"] == 4
    assert main(["list", "--store", str(store / "empty")]) == 0
    assert capsys.readouterr().out.startswith("no prefixes in ")


def test_export_peft_names_a_base_model_peft_loads(stored, model_dir, tmp_path, monkeypatch):
    """The exported adapter_config names the model directory the server ran on (absolute), so PEFT's
    AutoPeftModelForCausalLM loads base and adapter from the adapter directory alone, offline."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    store, adapter = stored
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(model_dir.parent)  # a relative --model, as a user on the command line would type it
    out = tmp_path / "exported"
    assert main(["export-peft", "table-task", str(out), "--store", str(store), "--model", model_dir.name]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    exported = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter)).eval()
    ids = torch.tensor([[464, 3290, 318, 257]])
    with torch.no_grad():
        assert torch.equal(exported.generate(input_ids=ids, max_new_tokens=6, do_sample=False),
                           original.generate(input_ids=ids, max_new_tokens=6, do_sample=False))


def test_lora_import_list_and_export_round_trip(model_dir, tmp_path, capsys):
    """import-peft takes a PEFT LoRA adapter, list shows its rank, export-peft writes PEFT's own tensors back bit
    for bit with a config naming the served model, and PEFT loads that directory."""
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    from tests.tiny import save_lora_adapter

    adapter, store, out = save_lora_adapter("gpt2", tmp_path / "lora", r=4, seed=3), tmp_path / "s", tmp_path / "x"
    assert main(["import-peft", str(adapter), "--task", "lo", "--model", str(model_dir), "--store", str(store)]) == 0
    assert main(["list", "--store", str(store)]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "lo" and row[2:4] == ["peft:lora", "r=4"]
    assert main(["export-peft", "lo", str(out), "--store", str(store), "--model", str(model_dir)]) == 0
    original, exported = (load_file(str(d / "adapter_model.safetensors")) for d in (adapter, out))
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(model_dir.resolve())
    assert AutoPeftModelForCausalLM.from_pretrained(str(out)) is not None
