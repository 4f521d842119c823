"""Import a script of bench/ (not a package) as a module, for the tests of its pure parts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str, module_name: str | None = None):
    """bench/<name>.py as a fresh module named `module_name` (default: name)."""
    spec = importlib.util.spec_from_file_location(module_name or name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
