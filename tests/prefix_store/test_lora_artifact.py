"""The LoRA task kind: PEFT LoRA -> native -> PEFT is bit-exact; every validation failure names its field."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from basemodel.convert import artifact_from_files
from prefix_store.artifact import (ArtifactError, Manifest, PrefixArtifact, build_artifact, load_dir, save_dir,
                                   validate)
from prefix_store.lora import REFUSED, export_peft_lora, lora_scaling
from prefix_store.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_dir
from tests.tiny import loaded_tiny, save_lora_adapter

A0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
B0 = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"


@pytest.fixture(scope="module")
def gpt2():
    return loaded_tiny("gpt2")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """A PEFT LoRA adapter (r 4, PEFT's default c_attn target) for the tiny GPT-2, as files."""
    return read_dir(save_lora_adapter("gpt2", tmp_path_factory.mktemp("l") / "ad", r=4, seed=1))


def changed(files: dict[str, bytes], cfg: dict | None = None, weights: dict | None = None,
            drop: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The adapter's files with config keys replaced and weights replaced, added or dropped."""
    c = dict(json.loads(files[ADAPTER_CONFIG]), **(cfg or {}))
    w = {k: v for k, v in st_load(files[ADAPTER_WEIGHTS]).items() if k not in drop}
    w.update(weights or {})
    return {ADAPTER_CONFIG: json.dumps(c).encode(), ADAPTER_WEIGHTS: st_save(w)}


def refused(files: dict[str, bytes], loaded) -> ArtifactError:
    with pytest.raises(ArtifactError) as e:
        artifact_from_files(files, loaded)
    return e.value


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_lora_round_trip_is_bit_exact(kind, tmp_path):
    loaded = loaded_tiny(kind)
    src = read_dir(save_lora_adapter(kind, tmp_path / "ad", r=8, seed=2, use_rslora=True))
    art = artifact_from_files(src, loaded)
    m = art.manifest
    assert (m.kind, m.format_version, m.source, m.prefix_length) == ("lora", 3, "peft:lora", 0)
    targets = ("attn.c_attn",) if kind == "gpt2" else ("self_attn.q_proj", "self_attn.v_proj")
    assert len(m.lora["modules"]) == 2 * len(targets) and all(x.endswith(targets) for x in m.lora["modules"])
    assert lora_scaling(m.lora) == pytest.approx(16 / 8 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    again = load_dir(save_dir(art, tmp_path / "native"))  # native bytes round trip, hash checked
    assert again.manifest == m
    out = export_peft_lora(again)
    original, exported = st_load(src[ADAPTER_WEIGHTS]), st_load(out[ADAPTER_WEIGHTS])
    assert set(exported) == set(original) and all(torch.equal(exported[k], original[k]) for k in original)
    assert json.loads(out[ADAPTER_CONFIG]) == json.loads(src[ADAPTER_CONFIG])
    assert artifact_from_files(out, loaded).manifest.sha256 == m.sha256  # and in again: the same version
    named = json.loads(export_peft_lora(again, base_model_name="/models/x")[ADAPTER_CONFIG])
    assert named["base_model_name_or_path"] == "/models/x"


def test_regex_target_modules_and_native_upload(gpt2, files):
    art = artifact_from_files(changed(files, {"target_modules": r"transformer\.h\.\d+\.attn\.c_attn"}), gpt2)
    assert art.manifest.sha256 == artifact_from_files(files, gpt2).manifest.sha256
    manifest, tensors = art.to_bytes()
    native = artifact_from_files({"manifest.json": manifest, "prefix.safetensors": tensors}, gpt2)
    assert native.manifest.lora == art.manifest.lora


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_each_variant_is_refused_by_name(gpt2, files, key):
    value = {"use_dora": True, "bias": "all", "lora_bias": True, "use_qalora": True, "layers_to_transform": [0],
             "layers_pattern": "h", "modules_to_save": ["lm_head"], "exclude_modules": ["c_proj"]}.get(key, {"x": 1})
    e = refused(changed(files, {key: value}), gpt2)
    assert e.field == f"adapter_config.{key}" and REFUSED[key] in str(e) and "not served" in str(e)


@pytest.mark.parametrize("cfg, field", [
    ({"r": 0}, "adapter_config.r"), ({"r": "4"}, "adapter_config.r"), ({"r": True}, "adapter_config.r"),
    ({"lora_alpha": "8"}, "adapter_config.lora_alpha"), ({"use_rslora": "yes"}, "adapter_config.use_rslora"),
    ({"fan_in_fan_out": 1}, "adapter_config.fan_in_fan_out"), ({"task_type": "SEQ_CLS"}, "adapter_config.task_type"),
    ({"target_modules": None}, "adapter_config.target_modules"), ({"target_modules": []},
                                                                  "adapter_config.target_modules"),
    ({"target_modules": "all-linear"}, "adapter_config.target_modules"),
    ({"target_modules": "("}, "adapter_config.target_modules"),
    ({"target_modules": ["q_proj"]}, "adapter_config.target_modules"),  # a LLaMA name: nothing here matches
    ({"target_modules": ["attn"]}, "adapter_config.target_modules"),  # GPT2Attention, not a linear layer
    ({"target_modules": ["c_attn", "c_fc"]}, "adapter_model.safetensors"),  # c_fc's weights are missing
    ({"peft_type": "IA3"}, "adapter_config.peft_type"),
])
def test_bad_config_values_are_named(gpt2, files, cfg, field):
    e = refused(changed(files, cfg), gpt2)
    assert e.field == field, str(e)
    if cfg.get("target_modules") == ["attn"]:
        assert "transformer.h.0.attn, a GPT2Attention" in str(e)


def test_bad_weights_are_named(gpt2, files):
    a0 = st_load(files[ADAPTER_WEIGHTS])[A0]
    cases = [
        (changed(files, drop=(B0,)), "adapter_model.safetensors", B0),  # a missing half
        (changed(files, weights={A0: a0[:2]}), "tensors.transformer.h.0.attn.c_attn.lora_A.shape", "r = 4"),
        (changed(files, weights={A0: torch.zeros(4, 65)}), "tensors.transformer.h.0.attn.c_attn.lora_A.shape",
         "[4, 64]"),  # in_features of c_attn is 64
        (changed(files, weights={A0.replace("h.0", "h.1"): a0.half()}),  # one dtype for all (here h.0's)
         "tensors.transformer.h.1.attn.c_attn.lora_A.dtype", "found float16"),
        (changed(files, weights={A0: a0 * float("nan")}), "tensors.transformer.h.0.attn.c_attn.lora_A", "NaN"),
        (changed(files, weights={"base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": a0}),
         "adapter_model.safetensors", "other modules"),
        (changed(files, weights={"base_model.model.transformer.wte.lora_embedding_A": a0}),
         "adapter_model.safetensors.base_model.model.transformer.wte.lora_embedding_A", "embedding LoRA"),
        (changed(files, weights={"base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector": a0[0]}),
         "adapter_model.safetensors.base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector", "DoRA"),
        (changed(files, weights={B0.replace(".weight", ".bias"): a0[0]}),
         "adapter_model.safetensors." + B0.replace(".weight", ".bias"), "lora_bias"),
        (changed(files, weights={"something.else": a0}), "adapter_model.safetensors.something.else",
         "not a LoRA weight"),
    ]
    for bad, field, words in cases:
        e = refused(bad, gpt2)
        assert e.field == field and words in str(e), str(e)


def test_adapters_of_other_models_are_refused(gpt2, files, tmp_path):
    llama = loaded_tiny("llama")
    assert refused(files, llama).field == "adapter_config.target_modules"  # c_attn: not a LLaMA module
    e = refused(files, loaded_tiny("bart"))
    assert e.field == "adapter_config.peft_type" and "decoder-only" in str(e)
    manifest, tensors = artifact_from_files(files, gpt2).to_bytes()
    e = refused({"manifest.json": manifest, "prefix.safetensors": tensors}, llama)  # native: the fingerprint
    assert e.field.startswith("base_model.")


def test_native_manifest_failures_are_named(gpt2, files):
    art = artifact_from_files(files, gpt2)
    d = json.loads(art.manifest.to_json())
    for change, field in [({"format_version": 2}, "manifest.format_version"), ({"kind": "ia3"}, "manifest.kind"),
                          ({"lora": {**d["lora"], "r": 0}}, "lora.r"),
                          ({"lora": {k: v for k, v in d["lora"].items() if k != "modules"}}, "lora.modules"),
                          ({"lora": {**d["lora"], "dropout": 0.1}}, "lora"),
                          ({"prefix_length": 3}, "prefix_length")]:
        with pytest.raises(ArtifactError) as e:
            validate(PrefixArtifact(Manifest.from_json({**d, **change}), art.tensors), gpt2.spec.fingerprint())
        assert e.value.field == field, str(e.value)
    with pytest.raises(ArtifactError) as e:  # a tensor gone
        validate(PrefixArtifact(art.manifest, dict(list(art.tensors.items())[1:])), gpt2.spec.fingerprint())
    assert e.value.field == "tensors"
    with pytest.raises(ArtifactError) as e:  # a prefix manifest may not carry a LoRA entry
        Manifest.from_json({**json.loads(build_artifact(torch.zeros(2, 2, 4, 1, 16), {}).manifest.to_json()),
                            "lora": d["lora"]})
    assert e.value.field == "manifest.lora"
