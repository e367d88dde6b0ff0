"""The architecture's rules are contracts that fail the build (``lint-imports``, run by
``make lint``; pyproject.toml's ``[tool.importlinter]``). These tests break a copy of the tree
on purpose and check the contracts catch it, and keep package folders small."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "policies", "simulator", "kvrouter")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.fixture(scope="module")
def lint_imports() -> Path:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the test extras (make install)")
    return LINT_IMPORTS


def test_the_tree_keeps_its_contracts(lint_imports: Path, tmp_path: Path) -> None:
    result = _lint(_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    # A cycle hidden behind TYPE_CHECKING is still a cycle.
    ("router/pd/serving.py",
     "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from router.proxy import Proxy\n",
     "no import cycles anywhere"),
    ("policies/kv_aware.py", "\nimport asyncio\n", "policies are pure"),
    ("policies/types.py", "\nimport policies.kv.index\n", "no import cycles anywhere"),
    ("simulator/cluster.py", "\nimport router.pool\n", "the simulator never imports the router"),
    ("router/http/client.py", "\nimport router.metrics\n", "the router's rooms, layered"),
])
def test_a_broken_rule_fails_the_build(lint_imports: Path, tmp_path: Path, module: str,
                                       line: str, contract: str) -> None:
    tree = _tree(tmp_path)
    _append(tree / module, line)
    result = _lint(tree)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken), result.stdout


def test_no_package_folder_holds_more_than_twenty_modules() -> None:
    for package in PACKAGES:
        for folder in [ROOT / package, *(p.parent for p in (ROOT / package).rglob("__init__.py"))]:
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            assert len(modules) <= 20, f"{folder.relative_to(ROOT)} holds {len(modules)} modules"
