"""ml_collections config files for `python -m beam_jax.train` / `beam_jax.pretrain`.

A bare name (`tiny`, `tiny.py`, `mixtral`) resolves to a file in this directory; anything else is a path.
Each file defines `get_config()`, starting from `base.get_config()` and overriding only what differs.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def resolve(name_or_path: str) -> str:
    """'tiny' / 'tiny.py' -> this package's configs/tiny.py; an existing path is returned as is."""
    p = Path(name_or_path)
    if p.is_file():
        return str(p)
    stem = p.name[:-3] if p.name.endswith(".py") else p.name
    candidate = CONFIG_DIR / f"{stem}.py"
    if p.parent == Path(".") and candidate.is_file():
        return str(candidate)
    known = sorted(f.stem for f in CONFIG_DIR.glob("*.py") if not f.stem.startswith("_") and f.stem != "base")
    raise FileNotFoundError(f"config {name_or_path!r}: no such file, and not one of the built-in configs {known}")
