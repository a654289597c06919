"""Artifact format version 2: encoder, decoder and cross-attention prefixes, the positions convention, and
version 1 artifacts still read with their old meaning."""
from __future__ import annotations

import json

import pytest
import torch

from basemodel.model import spec_from_config
from prefix_store.artifact import (ArtifactError, Manifest, PrefixArtifact, build_artifact, load_dir, save_dir,
                                   tensors_sha256, validate)
from tests.tiny import tiny_config

BART = spec_from_config(tiny_config("bart", encoder_layers=3, encoder_attention_heads=2)).fingerprint()
GPT2 = spec_from_config(tiny_config("gpt2")).fingerprint()


def _kv(layers: int, heads: int, p: int, dim: int) -> torch.Tensor:
    return torch.randn(layers, 2, heads, p, dim)  # [layers, 2, kv_heads, P, head_dim]


def _bart(p: int = 0, p_enc: int = 0, p_cross: int = 0, positions: str = "from_zero") -> PrefixArtifact:
    return build_artifact(_kv(2, 4, p, 16) if p else None, BART,
                          encoder_kv=_kv(3, 2, p_enc, 32) if p_enc else None,
                          cross_kv=_kv(2, 4, p_cross, 16) if p_cross else None, positions=positions)


def test_fingerprints_carry_the_encoder_only_where_there_is_one():
    assert BART["num_encoder_layers"] == 3 and BART["num_encoder_kv_heads"] == 2 and BART["encoder_head_dim"] == 32
    assert BART["num_layers"] == 2 and BART["num_kv_heads"] == 4 and BART["head_dim"] == 16
    assert not {"num_encoder_layers", "num_encoder_kv_heads", "encoder_head_dim"} & set(GPT2)


@pytest.mark.parametrize("lengths", [(3, 5, 7), (4, 0, 0), (0, 6, 0), (0, 0, 2), (0, 4, 9)])
def test_any_subset_of_the_three_round_trips(lengths, tmp_path):
    p, p_enc, p_cross = lengths
    art = _bart(p, p_enc, p_cross)
    m = art.manifest
    assert (m.prefix_length, m.encoder_prefix_length, m.cross_prefix_length) == lengths
    assert m.format_version == 2 and m.positions == "from_zero"
    assert m.nbytes == sum(t.numel() * 4 for t in art.tensors.values())
    validate(art, BART)
    again = load_dir(save_dir(art, tmp_path / "a"))
    assert again.manifest == m and sorted(again.tensors) == sorted(art.tensors)
    for name, t in art.tensors.items():
        assert torch.equal(again.tensors[name], t)
    assert (again.encoder_kv is not None) == bool(p_enc) and (again.cross_kv is not None) == bool(p_cross)


def test_manifest_keywords_and_tensor_dict_construct_an_artifact():
    tensors = {"kv": _kv(2, 4, 3, 16), "encoder_kv": _kv(3, 2, 5, 32), "cross_kv": _kv(2, 4, 7, 16)}
    m = Manifest(base_model=dict(BART), prefix_length=3, dtype="float32", sha256=tensors_sha256(tensors),
                 encoder_prefix_length=5, cross_prefix_length=7, positions="from_zero")
    validate(PrefixArtifact(m, tensors), BART)
    assert Manifest.from_json(m.to_json()) == m


def test_version_1_artifacts_read_as_kv_with_peft_positions():
    art = build_artifact(_kv(2, 4, 5, 16), GPT2)
    d = json.loads(art.manifest.to_json())
    for key in ("encoder_prefix_length", "cross_prefix_length", "positions"):
        d.pop(key)
    d["format_version"] = 1  # exactly what a version-1 writer produced
    m = Manifest.from_json(json.dumps(d))
    assert m.format_version == 1 and m.positions == "after_prefix" and m.encoder_prefix_length == 0
    validate(PrefixArtifact(m, art.tensors), GPT2)
    with pytest.raises(ArtifactError) as e:  # version 1 cannot carry version 2's fields
        Manifest.from_json(json.dumps(dict(d, positions="from_zero")))
    assert e.value.field == "manifest.positions"


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(positions="sideways"), "manifest.positions"),
    (lambda d: d.update(encoder_prefix_length="5"), "manifest.encoder_prefix_length"),
    (lambda d: d.update(format_version=3), "manifest.format_version"),
])
def test_manifest_field_errors_are_named(mutate, field):
    d = json.loads(_bart(3, 5, 7).manifest.to_json())
    mutate(d)
    with pytest.raises(ArtifactError) as e:
        Manifest.from_json(json.dumps(d))
    assert e.value.field == field


def test_validation_names_field_expected_and_found():
    art = _bart(3, 5, 7)
    art.manifest.encoder_prefix_length = 4
    want = r"tensors.encoder_kv.shape: expected \[3, 2, 2, 4, 32\], found \[3, 2, 2, 5, 32\]"
    with pytest.raises(ArtifactError, match=want):
        validate(art, BART)
    bad = build_artifact(_kv(2, 4, 3, 16), BART, cross_kv=_kv(2, 2, 6, 16))
    with pytest.raises(ArtifactError, match=r"tensors.cross_kv.shape: expected \[2, 2, 4, 6, 16\]"):
        validate(bad, BART)
    lying = _bart(3, 0, 0)
    lying.manifest.cross_prefix_length = 2
    with pytest.raises(ArtifactError) as e:
        validate(lying, BART)
    assert e.value.field == "cross_prefix_length" and e.value.found == 2
    nan = _bart(0, 5, 0)
    nan.tensors["encoder_kv"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ArtifactError, match="tensors.encoder_kv: expected finite values, found 1 NaN/inf"):
        validate(nan, BART, check_hash=False)
    with pytest.raises(ArtifactError, match="tensors: expected at least one"):
        build_artifact(None, BART)


def test_decoder_only_models_take_kv_and_peft_positions_only():
    fp = dict(GPT2)
    enc = build_artifact(_kv(2, 4, 3, 16), fp, cross_kv=_kv(2, 4, 3, 16))
    with pytest.raises(ArtifactError, match=r"tensors: expected one or more of \['kv'\], found \['cross_kv', 'kv'\]"):
        validate(enc, fp)
    zero = build_artifact(_kv(2, 4, 3, 16), fp, positions="from_zero")
    with pytest.raises(ArtifactError, match=r"positions: expected one of \['after_prefix'\], found from_zero"):
        validate(zero, fp)
    # a BART artifact against a decoder-only model fails on the fingerprint first
    with pytest.raises(ArtifactError) as e:
        validate(_bart(3, 5, 7), fp)
    assert e.value.field.startswith("base_model.")
