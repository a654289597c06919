"""The CPU kernels of the quantised serving mode (q4.cpp), compiled on first use and cached.

q4.cpp is plain C++ (no Python or torch headers), compiled with the system's C++ compiler (`g++`, or $CXX) for
x86-64 CPUs with AVX2, FMA and F16C, into a shared library cached under `<cache dir>/kernels/<hash>/` (the hash
covers the source and the flags, so an edited source builds anew). It is called through ctypes, which releases the
GIL for the call: the engine thread runs a whole forward in one call while the event loop keeps serving.

`load()` raises `KernelsUnavailable` (saying why) when the CPU lacks those instructions or no compiler is found;
the server then serves the model unquantised (server/engine/quant_runner.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

from basemodel.model import default_cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q4.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-ffp-contract=off"]
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class KernelsUnavailable(RuntimeError):
    """The quantised kernels cannot run here (the message says why)."""


class Q4Model(ctypes.Structure):
    """Mirror of `struct Q4Model` in q4.cpp."""

    _fields_ = [(name, ctypes.c_int32) for name in
                ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "max_pos")] + [
        ("eps", ctypes.c_float),
        ("layer_ptrs", ctypes.POINTER(ctypes.c_void_p)),
        ("final_norm", ctypes.c_void_p),
        ("head_q", ctypes.c_void_p),
        ("head_d", ctypes.c_void_p),
        ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p),
    ]


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def missing_cpu_flags() -> list[str]:
    """The instructions the kernels need that this CPU lacks."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [f"an x86-64 CPU (this is {platform.machine()})"]
    have = cpu_flags()
    return [f for f in REQUIRED_CPU_FLAGS if f not in have]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise KernelsUnavailable("no C++ compiler found (install g++, or set CXX)")
    return cxx


def _build(cache_dir: Path) -> Path:
    cxx = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cxx, *FLAGS]).encode()).hexdigest()[:16]
    out = cache_dir / "kernels" / key / "libq4.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"libq4.so.tmp{os.getpid()}")
    logger.info("compiling the quantised CPU kernels (once, a few seconds) into %s", out.parent)
    done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelsUnavailable(f"compiling {SOURCE.name} with {cxx} failed: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def load(cache_dir: Path | None = None) -> ctypes.CDLL:
    """The compiled kernels (built on first use), or KernelsUnavailable saying why they cannot run here."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        missing = missing_cpu_flags()
        if missing:
            raise KernelsUnavailable(f"the quantised kernels need {', '.join(missing)}, which this CPU lacks")
        lib = ctypes.CDLL(str(_build(cache_dir or default_cache_dir())))
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.q4_forward.argtypes = [ctypes.POINTER(Q4Model), p, p, p, i, i, p, p, i, i, i, i, p, i, p, p]
        lib.q4_forward.restype = i
        lib.q4_matmul_f32.argtypes = [p, p, p, i, i, p, i, p, i]
        lib.q4_matmul_f32.restype = i
        lib.q8_matmul_f32.argtypes = [p, p, i, i, p, i, p, i]
        lib.q8_matmul_f32.restype = i
        del f
        _lib = lib
        return lib
