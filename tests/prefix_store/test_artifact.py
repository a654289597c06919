"""Artifact format: PEFT -> native -> PEFT round trip is bit-exact; every validation failure is named."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from basemodel.convert import artifact_from_files
from prefix_store.artifact import (ArtifactError, ArtifactTooLarge, Manifest, PrefixArtifact, build_artifact,
                                   load_dir, save_dir, validate)
from prefix_store.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft, parse_peft, read_dir
from tests.engine.conftest import make_peft_adapter
from tests.tiny import loaded_tiny


@pytest.fixture(scope="module")
def llama():
    return loaded_tiny("llama")


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    return make_peft_adapter("llama", "prefix", 6, tmp_path_factory.mktemp("a") / "ad", seed=3)


def test_peft_native_peft_round_trip_is_bit_exact(llama, peft_dir, tmp_path):
    files = read_dir(peft_dir)
    art = artifact_from_files(files, llama)
    assert art.manifest.source == "peft:prefix_tuning" and art.manifest.prefix_length == 6
    assert list(art.kv.shape) == [2, 2, 2, 6, 16]  # [layers, 2, kv_heads (GQA), P, head_dim]
    # native bytes round trip
    again = load_dir(save_dir(art, tmp_path / "native"))
    assert torch.equal(again.kv, art.kv) and again.manifest == art.manifest
    # back to PEFT: the same tensor, bit for bit, and PEFT's own loader accepts it
    out = export_peft(again)
    orig = parse_peft(files).embeddings
    back = parse_peft(out).embeddings
    assert back.dtype == orig.dtype and torch.equal(back, orig)
    cfg = json.loads(out[ADAPTER_CONFIG])
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["token_dim"] == 32 and cfg["num_attention_heads"] == 2
    # and re-importing gives the same version id
    assert artifact_from_files(out, llama).manifest.sha256 == art.manifest.sha256


def test_prompt_tuning_is_converted(llama, tmp_path):
    d = make_peft_adapter("llama", "prompt", 4, tmp_path / "pt", seed=1)
    art = artifact_from_files(read_dir(d), llama)
    assert art.manifest.source == "peft:prompt_tuning" and art.manifest.prefix_length == 4


def _native(llama, **change):
    art = build_artifact(torch.randn(2, 2, 2, 5, 16), llama.spec.fingerprint())
    m, t = art.to_bytes()
    return m, t


@pytest.mark.parametrize("field,mutate", [
    ("base_model.num_layers", lambda d: d["base_model"].update(num_layers=3)),
    ("base_model.num_kv_heads", lambda d: d["base_model"].update(num_kv_heads=4)),
    ("base_model.head_dim", lambda d: d["base_model"].update(head_dim=8)),
    ("base_model.hidden_size", lambda d: d["base_model"].update(hidden_size=128)),
    ("base_model.vocab_size", lambda d: d["base_model"].update(vocab_size=10)),
    ("base_model.model_type", lambda d: d["base_model"].update(model_type="gpt2")),
    ("base_model.config_hash", lambda d: d["base_model"].update(config_hash="0" * 64)),
    ("manifest.sha256", lambda d: d.update(sha256="f" * 64)),
    ("manifest.format_version", lambda d: d.update(format_version=99)),
    ("manifest.prefix_length", lambda d: d.pop("prefix_length")),
    ("manifest", lambda d: d.update(surprise=1)),
    ("manifest.dtype", lambda d: d.update(dtype=5)),
])
def test_manifest_mismatch_names_the_field(llama, field, mutate):
    m, t = _native(llama)
    d = json.loads(m)
    mutate(d)
    with pytest.raises(ArtifactError) as e:
        artifact_from_files({"manifest.json": json.dumps(d).encode(), "prefix.safetensors": t}, llama)
    assert e.value.field == field and field in str(e.value)


def test_shape_dtype_nan_and_tensor_name_failures(llama):
    fp = llama.spec.fingerprint()
    wrong = build_artifact(torch.randn(2, 2, 2, 5, 8), fp)
    with pytest.raises(ArtifactError, match=r"tensors.kv.shape: expected \[2, 2, 2, 5, 16\]"):
        validate(wrong, fp)
    nan = torch.randn(2, 2, 2, 5, 16)
    nan[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ArtifactError, match="tensors.kv: expected finite values, found 1 NaN/inf"):
        validate(build_artifact(nan, fp), fp)
    inf = torch.randn(2, 2, 2, 5, 16)
    inf[1, 1, 1, 1, 1] = float("inf")
    with pytest.raises(ArtifactError, match="finite"):
        validate(build_artifact(inf, fp), fp)
    extra = build_artifact(torch.randn(2, 2, 2, 5, 16), fp)
    extra.tensors["other"] = torch.zeros(1)
    with pytest.raises(ArtifactError, match="tensors: expected"):
        validate(extra, fp)
    lying = build_artifact(torch.randn(2, 2, 2, 5, 16), fp)
    lying.manifest.dtype = "float16"
    with pytest.raises(ArtifactError, match="dtype: expected float16, found float32"):
        validate(lying, fp)


def test_hostile_safetensors_refused_before_allocation(llama):
    m, t = _native(llama)
    # a header that claims a 100 GB tensor
    header = json.dumps({"kv": {"dtype": "F32", "shape": [25_000_000_000], "data_offsets": [0, 100_000_000_000]}})
    huge = struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16
    with pytest.raises(ArtifactTooLarge, match="tensors.kv.shape"):
        PrefixArtifact.from_bytes(m, huge)
    with pytest.raises(ArtifactError, match="truncated"):
        PrefixArtifact.from_bytes(m, t[:5])
    with pytest.raises(ArtifactError, match="data_offsets"):
        PrefixArtifact.from_bytes(m, t[:-4])
    with pytest.raises(ArtifactError, match="header"):
        PrefixArtifact.from_bytes(m, struct.pack("<Q", 10**12) + b"{}")
    bad_dtype = st_save({"kv": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(ArtifactError, match=r"tensors.kv.dtype"):
        PrefixArtifact.from_bytes(m, bad_dtype)
    with pytest.raises(ArtifactTooLarge, match="tensors.size"):
        PrefixArtifact.from_bytes(m, t, max_bytes=100)
    with pytest.raises(ArtifactError, match="manifest: expected valid JSON"):
        PrefixArtifact.from_bytes(b"{not json", t)


def test_peft_failures_name_the_problem(llama, peft_dir):
    files = read_dir(peft_dir)
    with pytest.raises(ArtifactError, match="pickle checkpoints are not loaded"):
        artifact_from_files({ADAPTER_CONFIG: files[ADAPTER_CONFIG],
                             "adapter_model.bin": pickle.dumps({"x": 1})}, llama)
    cfg = json.loads(files[ADAPTER_CONFIG])
    for key, value, field in [("peft_type", "IA3", "adapter_config.peft_type"),
                              ("task_type", "SEQ_CLS", "adapter_config.task_type"),
                              ("num_layers", 7, "adapter_config.num_layers"),
                              ("num_virtual_tokens", 9, "adapter_config.num_virtual_tokens")]:
        bad = dict(cfg, **{key: value})
        with pytest.raises(ArtifactError) as e:
            artifact_from_files({ADAPTER_CONFIG: json.dumps(bad).encode(), ADAPTER_WEIGHTS: files[ADAPTER_WEIGHTS]},
                                llama)
        assert e.value.field == field
    wrong_width = st_save({"prompt_embeddings": torch.randn(6, 100)})
    with pytest.raises(ArtifactError, match=r"prompt_embeddings.shape\[1\]: expected 128"):
        artifact_from_files({ADAPTER_CONFIG: files[ADAPTER_CONFIG], ADAPTER_WEIGHTS: wrong_width}, llama)
    with pytest.raises(ArtifactError, match="files: expected a PEFT adapter"):
        artifact_from_files({"random.txt": b"hi"}, llama)
    with pytest.raises(ArtifactError, match="adapter_config.json: expected valid JSON"):
        artifact_from_files({ADAPTER_CONFIG: b"\xff", ADAPTER_WEIGHTS: files[ADAPTER_WEIGHTS]}, llama)


def test_manifest_json_round_trip():
    m = Manifest(base_model={"a": 1}, prefix_length=3, dtype="float32", sha256="x" * 64, description="d")
    assert Manifest.from_json(m.to_json()) == m
