"""The Makefile notices an environment that a later install broke: with its stamp present but huggingface-hub
downgraded (what `pip install text-generation` into .venv does), `make serve` installs again instead of serving
from a .venv where transformers cannot be imported. Run with `make -n` on a throwaway venv that sees the test
environment's packages: the real break (the real huggingface-hub 0.36 wheel), nothing installed for real."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BREAKING = "huggingface-hub==0.36.2"  # what `pip install text-generation==0.7.0` puts in (it pins hub < 1)


def _venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv (no pip of its own) whose site-packages adds this test environment's: (venv, its site-packages)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "outer.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return venv, site


def _stamp(venv: Path, site: Path) -> Path:
    """The install stamp, newer than site-packages (as right after `make setup`)."""
    stamp = venv / ".installed"
    stamp.touch()
    past = time.time() - 60
    os.utime(site, (past, past))
    return stamp


# What an outer make (CI runs pytest inside `make test`) hands its children: a nested make would inherit its
# command-line variables and flags and, at MAKELEVEL > 0, print "make[1]: Entering directory" around its output.
OUTER_MAKE = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR")


def _make_n_serve(venv: Path) -> str:
    """`make -n serve` as a user types it at a shell, whether or not these tests run under make."""
    env = {k: v for k, v in os.environ.items() if k not in OUTER_MAKE}
    done = subprocess.run(["make", "-n", "serve", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _imports(venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import server.app"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_make_serve_reinstalls_when_an_install_broke_the_venv(tmp_path):
    venv, site = _venv(tmp_path)
    assert _imports(venv).returncode == 0
    stamp = _stamp(venv, site)
    out = _make_n_serve(venv)  # nothing changed since the stamp: serve straight away, no import tried
    assert "pip install" not in out and "prefixserve serve" in out and stamp.exists()

    (site / "unrelated.txt").write_text("x")  # site-packages changed but the server still imports: stamp renewed
    before = stamp.stat().st_mtime
    out = _make_n_serve(venv)
    assert "pip install" not in out and stamp.exists() and stamp.stat().st_mtime > before

    _stamp(venv, site)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), BREAKING],
                   check=True, capture_output=True, timeout=300)  # the downgrade, shadowing the environment's hub
    broken = _imports(venv)
    assert broken.returncode != 0 and "ResolvedRevision" in broken.stderr, broken.stderr[-2000:]
    out = _make_n_serve(venv)
    assert "no longer imports the server" in out and not stamp.exists()
    assert "pip install -q -e ." in out and out.rstrip().endswith("prefixserve serve --host 127.0.0.1 --port 8000 "
                                                                   "--device cpu")
