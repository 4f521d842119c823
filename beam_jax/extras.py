"""Optional dependencies, imported where they are needed: a missing one is a `MissingExtraError` whose one-line
message names the pip extra that installs it (the entry points print it as `error: ...`, no traceback)."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the module, what needs it and the extra."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """`importlib.import_module(module)`, or MissingExtraError naming `extra` (a key of pyproject's
    [project.optional-dependencies]) when the module is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.split(".")[0] != e.name.split(".")[0]:
            raise  # the module is there but one of its own imports is broken: not a missing extra
        raise MissingExtraError(f"{needed_for} needs the Python package '{module.split('.')[0]}', which is not "
                                f"installed: pip install -e \".[{extra}]\" (the '{extra}' extra of beam-jax)",
                                name=module) from None
