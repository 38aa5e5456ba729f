"""The layout's rules, checked on every `make test`: import-linter's contracts
(pyproject.toml `[tool.importlinter]`) and ruff's lint with its line length."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import PROJECT_DIR

BIN = Path(sys.executable).parent


def _run(*args: str, cwd: Path = PROJECT_DIR) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_dependency_contracts_are_kept():
    result = _run(str(BIN / "lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_broken_contract_fails(tmp_path):
    # Prepare: a copy of the packages in which a strategy imports the server
    for package in ("scripts", "fl_server", "fl_clients", "tasks", "fl_common", "strategies", "edgesim", "fl_datasets"):
        shutil.copytree(PROJECT_DIR / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_DIR / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "strategies" / "leak.py").write_text(textwrap.dedent("""
        from fl_server.experiments import config  # a strategy must not know the platform
    """))
    # Execute
    result = _run(sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from importlinter.cli import lint_imports_command;"
                  " lint_imports_command()", "--no-cache", cwd=tmp_path)
    # Assert
    assert result.returncode != 0
    assert "Strategies import nothing of the platform BROKEN" in result.stdout


def test_ruff_lint_and_line_length():
    result = _run(str(BIN / "ruff"), "check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout[-4000:]
