"""Deterministic train / validation / test splits by a stable hash of a key (never by position or RNG).

An item goes to the split whose cumulative-fraction interval holds ``u`` = (the first 8 bytes of
``sha1(salt + key)``) / 2**64 in [0, 1). The result does not depend on the order, number or platform of
the items, and adding items never moves old ones. Examples are keyed by their content, so duplicates
land in the same split.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable, Mapping, TypeVar

from beam_jax.data.readers import Example

__all__ = ["DEFAULT_FRACTIONS", "hash_unit", "assign_split", "split_by_hash", "example_key", "split_examples"]

T = TypeVar("T")
DEFAULT_FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}


def hash_unit(key: str, salt: str = "") -> float:
    """Stable number in [0, 1) from sha1 of ``salt + key`` (UTF-8)."""
    return int.from_bytes(hashlib.sha1((salt + key).encode("utf-8")).digest()[:8], "big") / 2.0**64


def _check(fractions: Mapping[str, float]) -> None:
    if not fractions or any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")


def assign_split(key: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, salt: str = "") -> str:
    """Name of the split ``key`` falls in (intervals in the mapping's order)."""
    _check(fractions)
    u = hash_unit(key, salt)
    acc = 0.0
    names = list(fractions)
    for name in names:
        acc += fractions[name]
        if u < acc:
            return name
    return names[-1]


def split_by_hash(items: Iterable[T], key: Callable[[T], str], fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                  salt: str = "") -> dict[str, list[T]]:
    """``{split: [items in input order]}`` (every split present, possibly empty)."""
    _check(fractions)
    out: dict[str, list[T]] = {name: [] for name in fractions}
    for it in items:
        out[assign_split(key(it), fractions, salt)].append(it)
    return out


def example_key(example: Example) -> str:
    """Content key of an example: its text, or its messages as canonical JSON."""
    if example.is_chat:
        return json.dumps(list(example.messages), sort_keys=True, ensure_ascii=False)
    return example.text


def split_examples(examples: Iterable[Example], fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                   salt: str = "") -> dict[str, list[Example]]:
    """Split examples by content hash (see module docstring)."""
    return split_by_hash(examples, example_key, fractions, salt)
