"""Every benchmark module imports (a renamed helper once left bench.fairness_bench unable to start), and every
benchmark script with options answers --help (bench.llama_server's own main builds llama-server: not run here)."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
SCRIPTS = [m for m in MODULES if "argparse" in (src := (BENCH / f"{m}.py").read_text()) and "__main__" in src]


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_imports(name):
    importlib.import_module(f"bench.{name}")


def test_bench_scripts_answer_help():
    assert {"fairness_bench", "peer_bench", "engine_bench"} <= set(SCRIPTS)
    procs = {name: subprocess.Popen([sys.executable, "-m", f"bench.{name}", "--help"], cwd=BENCH.parent, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in SCRIPTS}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "usage" in out.lower(), (name, err[-2000:])
