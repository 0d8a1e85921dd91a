"""The CI guardrails themselves: ruff and the import-linter contracts of DESIGN.md's layering.

`make test` runs them before pytest (target ``lint``); these tests check that they pass
on the tree and that the contracts really catch a broken layer (on a copy of the tree).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PACKAGES = ("dicom_node", "inference", "rtstruct")


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in this environment (pip install -e '.[test]')")
    return path


def _copy_tree(dst: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # grimp imports nothing, it reads the files; the copy must come first on the path
    env = {"PYTHONPATH": str(cwd), "PATH": str(BIN)}
    return subprocess.run(
        [str(_tool("lint-imports")), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_ruff_lint_and_format_pass_on_the_tree():
    ruff = _tool("ruff")
    lint = subprocess.run([str(ruff), "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([str(ruff), "format", "--check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_layering_contracts_hold_on_the_tree(tmp_path):
    result = _lint_imports(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and " 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "forbidden"),
    [
        ("inference/metrics.py", "import dicom_node.db", "dicom_node"),
        ("inference/geometry.py", "import rtstruct.reader", "rtstruct"),
        ("inference/propagation.py", "import pydicom", "pydicom"),
        ("rtstruct/writer.py", "import pynetdicom", "pynetdicom"),
        ("rtstruct/reader.py", "import sqlite3", "sqlite3"),
    ],
)
def test_a_broken_layer_fails_the_contracts(tmp_path, module, line, forbidden):
    tree = _copy_tree(tmp_path)
    target = tree / module
    target.write_text(target.read_text() + f"\n{line}  # a layering violation, on purpose\n")
    result = _lint_imports(tree)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert f"-> {forbidden}" in result.stdout
