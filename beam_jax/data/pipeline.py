"""Files -> packed rows in one call: read, encode, pack."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from beam_jax.data.encode import encode_examples
from beam_jax.data.packing import Packed, pack
from beam_jax.data.readers import Example, read_examples

__all__ = ["read_all", "pack_examples", "load_packed"]


def read_all(paths: str | os.PathLike | Sequence[str | os.PathLike], format: str | None = None,
             **reader_kw) -> list[Example]:
    """Examples from one path or several, in the order given (see ``readers.read_examples``)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [ex for p in paths for ex in read_examples(p, format, **reader_kw)]


def pack_examples(examples: Iterable[Example], tokenizer, seq_len: int, mode: str = "concat") -> Packed:
    """Encode examples with ``tokenizer`` and pack them into ``[N, seq_len + 1]`` rows.

    The padding id is the tokenizer's pad token, else its eos token, else 0 (padding never carries loss).
    """
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return pack(encode_examples(examples, tokenizer), seq_len, mode, pad_id=pad)


def load_packed(paths, tokenizer, seq_len: int, mode: str = "concat", format: str | None = None,
                **reader_kw) -> Packed:
    """``pack_examples(read_all(paths, format, **reader_kw), tokenizer, seq_len, mode)``."""
    return pack_examples(read_all(paths, format, **reader_kw), tokenizer, seq_len, mode)
