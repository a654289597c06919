"""Packages import one way (docs/architecture.md): prefixserve -> server, trainer -> basemodel -> prefix_store,
and trainer uses only the engine of server/ (to decode as the server does); server/ never imports trainer/.
Every import in every module counts, a function's own imports included."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"prefixserve", "server", "trainer", "basemodel", "prefix_store"}
MAY_IMPORT = {  # package -> the modules of the others it may import (a name covers its submodules)
    "prefix_store": set(),
    "basemodel": {"prefix_store"},
    "server": {"basemodel", "prefix_store"},
    "trainer": {"basemodel", "prefix_store", "server.engine"},
    "prefixserve": {"server", "trainer", "basemodel", "prefix_store"},
}


def imported_modules(path: Path) -> set[str]:
    """The modules of this project that a module imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in OURS}


def allowed(module: str, package: str) -> bool:
    """Whether `package` may import `module`: its own, or one MAY_IMPORT names (or a submodule of one)."""
    return module.split(".")[0] == package or any(module == m or module.startswith(m + ".")
                                                  for m in MAY_IMPORT[package])


def test_packages_import_one_way():
    wrong = [f"{path.relative_to(ROOT)} imports {module}"
             for package in MAY_IMPORT for path in sorted((ROOT / package).rglob("*.py"))
             for module in sorted(imported_modules(path)) if not allowed(module, package)]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from trainer.cli import main\n    import server.app\n")
    assert imported_modules(module) == {"trainer.cli", "server.app"}
    assert not allowed("server.app", "trainer") and allowed("server.engine.engine", "trainer")
    assert not allowed("trainer.cli", "server") and allowed("server.api.deps", "server")
