"""prefixctl against the real server: upload, list, get, generate, stream, download, delete, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefixserve_client.cli import main

PROMPT = "name : Zizzi | Type : pub"


def run(live, *args: str) -> int:
    return main(["--url", live.url, "--retries", "1", *args])


def test_prefixctl_round_trip(live, adapters, tmp_path, capsys):
    assert run(live, "upload", "ctl", str(adapters["a"]), "--description", "from the cli") == 0
    task, version = capsys.readouterr().out.split()
    assert task == "ctl" and len(version) == 64
    assert run(live, "list") == 0 and f"ctl\t{version[:12]}\t4" in capsys.readouterr().out
    assert run(live, "get", "ctl") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["version"] == version and got["manifest"]["description"] == "from the cli"

    assert run(live, "generate", "-t", "ctl", "-n", "4", PROMPT) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert run(live, "stream", "-t", "ctl", "-n", "4", PROMPT) == 0
    assert capsys.readouterr().out.rstrip("\n") == text
    assert run(live, "generate", "-t", "ctl", "-n", "4", "--json", PROMPT) == 0
    assert json.loads(capsys.readouterr().out)["details"]["generated_tokens"] == 4

    assert run(live, "download", "ctl", "-o", str(tmp_path / "ctl.zip")) == 0
    assert (tmp_path / "ctl.zip").stat().st_size > 0
    assert run(live, "download", "ctl", "--extract", str(tmp_path / "x")) == 0
    assert (tmp_path / "x" / "prefix.safetensors").exists()
    assert run(live, "models") == 0 and "ctl" in capsys.readouterr().out.split()
    assert run(live, "delete", "ctl") == 0 and version in capsys.readouterr().out
    assert run(live, "get", "ctl") == 1
    assert "404 not_found" in capsys.readouterr().err


def test_prefixctl_as_a_process(live):
    script = Path(sys.executable).with_name("prefixctl")  # the console script of `pip install clients/python`
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "prefixserve_client.cli"]
    out = subprocess.run([*cmd, "--url", live.url, "list", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and isinstance(json.loads(out.stdout), list)
    bad = subprocess.run([*cmd, "upload", "x", "/nonexistent"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a directory" in bad.stderr
