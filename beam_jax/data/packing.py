"""Sequence packing: encoded documents -> fixed-length rows, and rows -> model batches.

Rows hold ``S + 1`` tokens so that every one of the ``S`` input positions has a target inside the row:

    input_ids   = row[:, :-1]     [B, S] int32
    targets     = row[:, 1:]      [B, S] int32     targets[b, t] is the token after input_ids[b, t]
    loss_mask                     [B, S] float32   1 where the loss of predicting targets[b, t] counts
    segment_ids = seg[:, :-1]     [B, S] int32     1, 2, ... per document within the row, 0 on padding
    positions   = pos[:, :-1]     [B, S] int32     position within the document's piece in this row

``loss_mask[b, t] = train(targets[b, t]) and segment_ids of t and t+1 are equal and non-zero``: padding,
non-assistant chat tokens (see ``encode.py``) and the first token of a document (predicted across a
document boundary) carry no loss. Consumers that shift ``input_ids`` themselves get the same targets for
t < S - 1. Attention may be restricted to equal ``segment_ids``; a model that ignores them lets attention
cross documents inside a row (the loss still never crosses a boundary).

Two modes:

- ``"concat"`` (pretraining): documents are concatenated into one stream and cut into rows with stride S,
  consecutive rows sharing one token (row r = stream[r*S : r*S + S + 1]); nothing is truncated, only the
  last row is padded, every token is a target exactly once. A document split between rows continues in
  the next row with segment 1 and positions restarting at 0.
- ``"fit"`` (SFT): whole documents are placed in order into the current row while they fit and a new row is
  started when one does not; a document longer than S + 1 tokens is truncated to S + 1. Rows are padded.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

__all__ = ["Packed", "pack", "PACK_MODES"]

PACK_MODES = ("concat", "fit")


@dataclasses.dataclass(frozen=True)
class Packed:
    """Packed rows, all ``[N, S + 1]``: tokens int32, train bool, segment_ids int32 (0 = pad), positions int32."""

    tokens: np.ndarray
    train: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    pad_id: int = 0
    truncated_docs: int = 0  # documents cut short ("fit" mode)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Batch of the given row indices (``-1`` = an all-padding row with zero loss); arrays ``[B, S]``."""
        rows = np.asarray(rows, np.int64)
        fill = rows < 0
        take = np.where(fill, 0, rows)
        tok, tr, seg, pos = (a[take] for a in (self.tokens, self.train, self.segment_ids, self.positions))
        if fill.any():
            tok[fill], tr[fill], seg[fill], pos[fill] = self.pad_id, False, 0, 0
        mask = tr[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        return {
            "input_ids": tok[:, :-1],
            "targets": tok[:, 1:],
            "loss_mask": mask.astype(np.float32),
            "segment_ids": seg[:, :-1],
            "positions": pos[:, :-1],
        }

    def num_loss_tokens(self) -> int:
        """Number of targets that carry loss over all rows."""
        seg = self.segment_ids
        return int((self.train[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).sum())


def _stream(docs):
    lens = np.asarray([len(ids) for ids, _ in docs], np.int64)
    ids = np.concatenate([np.asarray(i, np.int32) for i, _ in docs])
    train = np.concatenate([np.asarray(t, bool) for _, t in docs])
    doc = np.repeat(np.arange(len(docs), dtype=np.int64), lens)
    starts = np.cumsum(lens) - lens
    pos = np.arange(ids.size, dtype=np.int64) - np.repeat(starts, lens)
    return ids, train, doc, pos


def _pack_concat(docs, seq_len, pad_id):
    ids, train, doc, pos = _stream(docs)
    total = ids.size
    n_rows = max(1, -(-(total - 1) // seq_len))
    idx = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    valid = idx < total
    safe = np.minimum(idx, total - 1)
    first = safe[:, :1]
    seg = np.where(valid, doc[safe] - doc[first] + 1, 0)
    p = np.where(seg == 1, pos[safe] - pos[first], pos[safe])
    return (np.where(valid, ids[safe], pad_id), valid & train[safe], seg, np.where(valid, p, 0), 0)


def _pack_fit(docs, seq_len, pad_id):
    cap = seq_len + 1
    rows: list[list[int]] = [[]]
    used = 0
    truncated = 0
    for d, (ids, _) in enumerate(docs):
        n = min(len(ids), cap)
        truncated += len(ids) > cap
        if used + n > cap:
            rows.append([])
            used = 0
        rows[-1].append(d)
        used += n
    shape = (len(rows), cap)
    tok, tr = np.full(shape, pad_id, np.int32), np.zeros(shape, bool)
    seg, pos = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, d in enumerate(members, start=1):
            ids, t = docs[d]
            n = min(len(ids), cap)
            tok[r, at:at + n], tr[r, at:at + n] = ids[:n], t[:n]
            seg[r, at:at + n], pos[r, at:at + n] = s, np.arange(n)
            at += n
    return tok, tr, seg, pos, truncated


def pack(docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, mode: str = "concat", pad_id: int = 0) -> Packed:
    """Pack encoded documents ``[(ids [L] int32, train [L] bool)]`` into ``[N, seq_len + 1]`` rows.

    Empty documents are skipped; at least one token overall is required. See the module docstring.
    """
    if mode not in PACK_MODES:
        raise ValueError(f"mode must be one of {PACK_MODES}, got {mode!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    docs = [(np.asarray(i, np.int32), np.asarray(t, bool)) for i, t in docs if len(i)]
    if not docs:
        raise ValueError("nothing to pack: no non-empty documents")
    for ids, t in docs:
        if ids.shape != t.shape or ids.ndim != 1:
            raise ValueError(f"ids and train must be equal-length 1-D arrays, got {ids.shape} and {t.shape}")
    tok, tr, seg, pos, truncated = (_pack_concat if mode == "concat" else _pack_fit)(docs, seq_len, pad_id)
    return Packed(tok.astype(np.int32), tr.astype(bool), seg.astype(np.int32), pos.astype(np.int32),
                  int(pad_id), int(truncated))
