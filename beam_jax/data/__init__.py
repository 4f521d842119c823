"""Training data for beam-jax: local files -> packed, sharded, resumable batches.

Modules, one job each:

- ``readers``:  files -> :class:`Example` (text or chat), format by extension, clear errors (``DataError``).
- ``encode``:   Example -> ``(ids [L] int32, train [L] bool)``; chat loss only on assistant tokens.
- ``packing``:  encoded docs -> :class:`Packed` rows ``[N, S+1]``; rows -> batch dict of ``[B, S]`` arrays
                (``input_ids, targets, loss_mask, segment_ids, positions``).
- ``iterator``: :class:`BatchIterator`, seeded order, ``state()``/``restore()``, per-process slices.
- ``splits``:   stable hash splits into train / validation / test.
- ``pipeline``: ``load_packed(paths, tokenizer, seq_len)`` = read + encode + pack.
"""

from beam_jax.data.encode import assistant_spans, encode_chat, encode_examples, encode_texts, render_chat
from beam_jax.data.errors import DataError
from beam_jax.data.iterator import BatchIterator, epoch_permutation
from beam_jax.data.packing import PACK_MODES, Packed, pack
from beam_jax.data.pipeline import load_packed, pack_examples, read_all
from beam_jax.data.readers import (EXTENSIONS, FORMATS, Example, detect_format, list_data_files, read_examples,
                                   read_text_file)
from beam_jax.data.splits import DEFAULT_FRACTIONS, assign_split, example_key, hash_unit, split_by_hash, split_examples

__all__ = [
    "DataError", "Example", "FORMATS", "EXTENSIONS", "detect_format", "list_data_files", "read_text_file",
    "read_examples", "render_chat", "assistant_spans", "encode_chat", "encode_texts", "encode_examples",
    "Packed", "PACK_MODES", "pack", "BatchIterator", "epoch_permutation", "DEFAULT_FRACTIONS", "hash_unit",
    "assign_split", "split_by_hash", "example_key", "split_examples", "read_all", "pack_examples", "load_packed",
]
