"""The prefix artifact: a JSON manifest plus safetensors tensors. No device code lives here.

Tensor layout (format version 2; each tensor optional, at least one present), keys at index 0 of dim 1, values at 1:

    kv:         [num_layers, 2, num_kv_heads, prefix_length, head_dim]                  # decoder self-attention
    encoder_kv: [num_encoder_layers, 2, num_encoder_kv_heads, encoder_prefix_length, encoder_head_dim]
    cross_kv:   [num_layers, 2, num_kv_heads, cross_prefix_length, head_dim]            # decoder cross-attention

Decoder-only models take `kv` only (format version 1 is exactly that). Keys are stored exactly as they sit in the
cache (for RoPE models: as cache entries, not re-rotated), which is how PEFT's prefix tuning injects them.
`positions` says where the decoder input's position ids start: "after_prefix" (at P, PEFT's convention) or
"from_zero" (Li & Liang's BART code). See docs/artifact-format.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2, 3)  # version 1: `kv` only, positions "after_prefix"; version 3: LoRA (prefix_store/lora.py)
PREFIX_KIND, LORA_KIND = "prefix_kv", "lora"  # the task kinds: a KV prefix, or a LoRA adapter
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "prefix.safetensors"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_MAX_HEADER_BYTES = 1024 * 1024
_DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(t: torch.Tensor) -> str:
    """A tensor's dtype as manifests write it (float32, float16, bfloat16)."""
    return _DTYPE_NAMES.get(t.dtype, str(t.dtype))
POSITIONS = ("after_prefix", "from_zero")


@dataclass(frozen=True)
class TensorKind:
    """One prefix tensor: which fingerprint keys give its shape and which manifest field its length."""

    layers: str  # fingerprint key: number of layers
    heads: str  # fingerprint key: key/value heads
    head_dim: str  # fingerprint key: head dim
    length: str  # manifest field: its prefix length
    needs_encoder: bool  # only for models with an encoder (their fingerprint has num_encoder_layers)


# tensor name -> its shape rule; the order is the order of the docs
TENSOR_KINDS: dict[str, TensorKind] = {
    "kv": TensorKind("num_layers", "num_kv_heads", "head_dim", "prefix_length", False),
    "encoder_kv": TensorKind("num_encoder_layers", "num_encoder_kv_heads", "encoder_head_dim",
                             "encoder_prefix_length", True),
    "cross_kv": TensorKind("num_layers", "num_kv_heads", "head_dim", "cross_prefix_length", True),
}


class ArtifactError(ValueError):
    """An artifact that cannot be served; names the field, the expected and the found value."""

    def __init__(self, field: str, expected: Any, found: Any, message: str | None = None):
        self.field, self.expected, self.found = field, expected, found
        super().__init__(message or f"{field}: expected {expected}, found {found}")


class ArtifactTooLarge(ArtifactError):
    """The artifact (or an upload) is over the configured size cap."""


@dataclass
class Manifest:
    """Everything a server needs to know about a prefix without reading its tensors."""

    base_model: dict[str, Any]
    prefix_length: int
    dtype: str
    sha256: str
    format_version: int = FORMAT_VERSION
    kind: str = PREFIX_KIND  # or LORA_KIND (format version 3)
    created: float = field(default_factory=time.time)
    description: str = ""
    source: str = "native"
    input_format: str = ""  # how inputs were formatted in training, e.g. "name : X | Type : Y | ..."
    nbytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    encoder_prefix_length: int = 0  # P of `encoder_kv` (0: none)
    cross_prefix_length: int = 0  # P of `cross_kv` (0: none)
    positions: str = "after_prefix"  # decoder position ids start at prefix_length, or "from_zero"
    lora: dict[str, Any] = field(default_factory=dict)  # a LoRA adapter's rank, alpha, modules (prefix_store/lora.py)

    @property
    def version(self) -> str:
        """The immutable version id of the artifact: the sha256 of its tensors."""
        return self.sha256

    def to_json(self) -> bytes:
        """Canonical JSON bytes (`lora` only in a LoRA manifest, so prefix manifests read as they did before it)."""
        d = asdict(self)
        if not d["lora"]:
            del d["lora"]
        return json.dumps(d, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str | dict) -> Manifest:
        """Parse and type-check a manifest; unknown keys are an error naming them."""
        try:
            d = data if isinstance(data, dict) else json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise ArtifactError("manifest", "valid JSON", f"invalid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ArtifactError("manifest", "a JSON object", type(d).__name__)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ArtifactError("manifest", f"only the fields {sorted(known)}", f"unknown fields {unknown}")
        for name in ("base_model", "prefix_length", "dtype", "sha256"):
            if name not in d:
                raise ArtifactError(f"manifest.{name}", "present", "missing")
        version = d.get("format_version", FORMAT_VERSION)
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise ArtifactError("manifest.format_version", f"one of {list(READABLE_VERSIONS)}", version)
        types = {"base_model": dict, "prefix_length": int, "dtype": str, "sha256": str, "kind": str,
                 "description": str, "source": str, "input_format": str, "extra": dict,
                 "encoder_prefix_length": int, "cross_prefix_length": int, "positions": str, "lora": dict}
        for name, typ in types.items():
            if name in d and (not isinstance(d[name], typ) or isinstance(d[name], bool)):
                raise ArtifactError(f"manifest.{name}", typ.__name__, type(d[name]).__name__)
        m = cls(**d)
        if m.kind not in (PREFIX_KIND, LORA_KIND):
            raise ArtifactError("manifest.kind", f"one of {[PREFIX_KIND, LORA_KIND]}", m.kind)
        if (m.kind == LORA_KIND) != (version == 3):
            raise ArtifactError("manifest.format_version", "3 for a LoRA adapter (kind lora), 1 or 2 for a prefix",
                                f"{version} with kind {m.kind}")
        if m.kind == PREFIX_KIND and m.lora:
            raise ArtifactError("manifest.lora", "absent in a prefix (kind prefix_kv)", sorted(m.lora))
        if m.positions not in POSITIONS:
            raise ArtifactError("manifest.positions", f"one of {list(POSITIONS)}", m.positions)
        if version == 1:  # version 1 means: `kv` only, PEFT's positions
            for name, v1 in (("encoder_prefix_length", 0), ("cross_prefix_length", 0), ("positions", "after_prefix")):
                if getattr(m, name) != v1:
                    raise ArtifactError(f"manifest.{name}", f"{v1!r} in format version 1 (use version 2)",
                                        getattr(m, name))
        return m


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash over names, dtypes, shapes and raw bytes, independent of how the file was serialised."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{dtype_name(t)}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class PrefixArtifact:
    """A manifest and its CPU tensors (see the module docstring for the layout)."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]

    @property
    def kv(self) -> torch.Tensor:
        """Decoder self-attention prefix [num_layers, 2, num_kv_heads, prefix_length, head_dim]."""
        return self.tensors["kv"]

    @property
    def encoder_kv(self) -> torch.Tensor | None:
        """Encoder self-attention prefix [encoder_layers, 2, kv_heads, encoder_prefix_length, head_dim], or None."""
        return self.tensors.get("encoder_kv")

    @property
    def cross_kv(self) -> torch.Tensor | None:
        """Decoder cross-attention prefix [num_layers, 2, kv_heads, cross_prefix_length, head_dim], or None."""
        return self.tensors.get("cross_kv")

    @property
    def nbytes(self) -> int:
        """Bytes its tensors hold in memory."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(manifest JSON, safetensors) as stored and uploaded."""
        return self.manifest.to_json(), st_save({k: v.contiguous() for k, v in self.tensors.items()})

    @classmethod
    def from_bytes(cls, manifest: bytes, tensors: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> PrefixArtifact:
        """Parse without trusting the input: header checked before allocation, hash verified."""
        m = Manifest.from_json(manifest)
        t = read_safetensors(tensors, max_bytes)
        found = tensors_sha256(t)
        if found != m.sha256:
            raise ArtifactError("manifest.sha256", m.sha256, found, "manifest.sha256 does not match the tensors "
                                f"(expected {m.sha256}, found {found})")
        return cls(m, t)


def build_artifact(kv: torch.Tensor | None, fingerprint: dict[str, Any], *, encoder_kv: torch.Tensor | None = None,
                   cross_kv: torch.Tensor | None = None, positions: str = "after_prefix", description: str = "",
                   source: str = "native", input_format: str = "",
                   extra: dict[str, Any] | None = None) -> PrefixArtifact:
    """Make an artifact from its prefix tensors, each [layers, 2, kv_heads, P, head_dim] (moved to CPU, contiguous).

    Any of the three may be None (at least one given); lengths are read from the tensors.
    """
    given = {"kv": kv, "encoder_kv": encoder_kv, "cross_kv": cross_kv}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in given.items() if t is not None}
    if not tensors:
        raise ArtifactError("tensors", f"at least one of {list(TENSOR_KINDS)}", "none")
    for name, t in tensors.items():
        if t.dim() != 5:
            raise ArtifactError(f"{name}.ndim", 5, t.dim())
    lengths = {TENSOR_KINDS[name].length: int(t.shape[3]) for name, t in tensors.items()}
    first = next(iter(tensors.values()))
    m = Manifest(base_model=dict(fingerprint), prefix_length=lengths.pop("prefix_length", 0),
                 dtype=dtype_name(first), sha256=tensors_sha256(tensors),
                 description=description, source=source, input_format=input_format, positions=positions,
                 nbytes=sum(t.numel() * t.element_size() for t in tensors.values()), extra=dict(extra or {}),
                 **lengths)
    return PrefixArtifact(m, tensors)


def check_safetensors_header(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """Parse and check a safetensors header before any tensor is allocated; return the header dict."""
    if len(data) > max_bytes:
        raise ArtifactTooLarge("tensors.size", f"<= {max_bytes} bytes", f"{len(data)} bytes")
    if len(data) < 8:
        raise ArtifactError("tensors", "a safetensors file", f"{len(data)} bytes (truncated)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(data):
        raise ArtifactError("tensors.header", f"a header of at most {min(_MAX_HEADER_BYTES, len(data) - 8)} bytes",
                            f"{n} bytes (not a safetensors file, or truncated)")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ArtifactError("tensors.header", "JSON", "unparseable bytes (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise ArtifactError("tensors.header", "a JSON object", type(header).__name__)
    body = len(data) - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ArtifactError(f"tensors.{name}", "dtype, shape and data_offsets", info)
        if info["dtype"] not in _DTYPES:
            raise ArtifactError(f"tensors.{name}.dtype", sorted(_DTYPES), info["dtype"])
        shape, offs = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise ArtifactError(f"tensors.{name}", "integer shape and data_offsets", info)
        need = math.prod(shape) * _DTYPES[info["dtype"]][1]
        if need > max_bytes:
            raise ArtifactTooLarge(f"tensors.{name}.shape", f"<= {max_bytes} bytes", f"{shape} ({need} bytes)")
        if offs[1] - offs[0] != need or not 0 <= offs[0] <= offs[1] <= body:
            raise ArtifactError(f"tensors.{name}.data_offsets", f"{need} bytes inside the file", offs)
    return header


def read_safetensors(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, torch.Tensor]:
    """Load safetensors bytes into CPU tensors after `check_safetensors_header` accepted them."""
    check_safetensors_header(data, max_bytes)
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise ArtifactError("tensors", "a valid safetensors file", str(e)) from None


def allowed_tensors(fingerprint: dict[str, Any]) -> list[str]:
    """The tensor names an artifact for this model may carry: `kv` only, unless the model has an encoder."""
    has_encoder = "num_encoder_layers" in fingerprint
    return [name for name, k in TENSOR_KINDS.items() if has_encoder or not k.needs_encoder]


def validate(artifact: PrefixArtifact, fingerprint: dict[str, Any], *, check_hash: bool = True) -> None:
    """Check an artifact against the loaded base model; raise ArtifactError naming the first mismatch."""
    m = artifact.manifest
    if m.kind == LORA_KIND:
        from prefix_store.lora import validate_lora  # that module builds on this one
        return validate_lora(artifact, fingerprint, check_hash=check_hash)
    for key, want in fingerprint.items():
        got = m.base_model.get(key)
        if got != want:
            raise ArtifactError(f"base_model.{key}", want, got)
    allowed = allowed_tensors(fingerprint)
    names = sorted(artifact.tensors)
    if not names or not set(names) <= set(allowed):
        raise ArtifactError("tensors", f"one or more of {allowed}", names)
    if m.positions not in POSITIONS or ("encoder_kv" not in allowed and m.positions != "after_prefix"):
        want = POSITIONS if "encoder_kv" in allowed else POSITIONS[:1]
        raise ArtifactError("positions", f"one of {list(want)}", m.positions)
    for name, kind in TENSOR_KINDS.items():
        _validate_tensor(artifact, name, kind, fingerprint)
    if check_hash and tensors_sha256(artifact.tensors) != m.sha256:
        raise ArtifactError("sha256", m.sha256, tensors_sha256(artifact.tensors))


def _validate_tensor(artifact: PrefixArtifact, name: str, kind: TensorKind, fingerprint: dict[str, Any]) -> None:
    m = artifact.manifest
    length = getattr(m, kind.length)
    t = artifact.tensors.get(name)
    if t is None:
        if length != 0:
            raise ArtifactError(kind.length, f"0 (no tensor {name})", length)
        return
    want_shape = [fingerprint[kind.layers], 2, fingerprint[kind.heads], length, fingerprint[kind.head_dim]]
    if list(t.shape) != want_shape:
        raise ArtifactError(f"tensors.{name}.shape", want_shape, list(t.shape))
    if length < 1:
        raise ArtifactError(kind.length, ">= 1", length)
    dtype = dtype_name(t)
    if dtype != m.dtype:
        raise ArtifactError("dtype", m.dtype, dtype)
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ArtifactError(f"tensors.{name}", "finite values", f"{bad} NaN/inf values")


def save_dir(artifact: PrefixArtifact, path: str | Path) -> Path:
    """Write an artifact as a directory: manifest.json + prefix.safetensors."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    manifest, tensors = artifact.to_bytes()
    (p / TENSORS_FILE).write_bytes(tensors)
    (p / MANIFEST_FILE).write_bytes(manifest)
    return p


def load_dir(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> PrefixArtifact:
    """Read an artifact directory written by `save_dir` (hash verified)."""
    p = Path(path)
    return PrefixArtifact.from_bytes((p / MANIFEST_FILE).read_bytes(), (p / TENSORS_FILE).read_bytes(), max_bytes)
