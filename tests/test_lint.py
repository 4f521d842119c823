"""The repository passes `ruff check` with pyproject.toml's rules (pycodestyle, pyflakes, 120 columns)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("ruff", reason="ruff comes with the `test` extra: pip install -e '.[test]'")


def _ruff(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_repository_is_clean():
    res = _ruff(".")
    assert res.returncode == 0, f"ruff check found problems:\n{res.stdout}\n{res.stderr}"


def test_ruff_reports_what_the_rules_forbid(tmp_path):
    """The same rules on a file with an unused import and a 121-column line: ruff must fail on it (the check above
    cannot pass by running nothing)."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "bad.py").write_text("import os\n\nx = '" + "a" * 115 + "'\n")
    res = _ruff("bad.py", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "F401" in res.stdout and "E501" in res.stdout, res.stdout
