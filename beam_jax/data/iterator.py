"""Deterministic, resumable, process-sharded batches over packed rows.

Order: each epoch visits the rows in a permutation fixed by ``(seed, epoch)`` (a splitmix64 hash of the row
index, argsorted: independent of numpy's RNG streams, so the same on any machine and numpy version).

Sharding: with P processes and a per-process batch of B rows, global step s of an epoch is rows
``perm[s*P*B : (s+1)*P*B]`` and process p takes the p-th slice of B of them. The union over processes at
each step is the single-process batch of size P*B, processes never share a row, and every process has the
same number of steps (rows left over after the last full global batch are skipped that epoch, a different
set each epoch; with ``drop_remainder=False`` the last batch is filled with ``-1`` rows, all padding, zero loss).

Resume: ``state()`` is a small JSON-able dict ``{epoch, step, seed, num_rows, global_batch_size}``;
``restore(state)`` continues with exactly the batches the uninterrupted run would have produced. The
global batch size must match, the process count may differ.

Every process still reads and packs all the data (cheap at this project's scale) and keeps only its rows.
A global ``jax.Array`` is ``jax.make_array_from_process_local_data(sharding, batch[key])`` per key.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from beam_jax.data.packing import Packed

__all__ = ["BatchIterator", "epoch_permutation"]

_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 (wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation [num_rows] int64 of row indices for ``(seed, epoch)``."""
    base = _splitmix64(np.array([seed & _M64], np.uint64))
    base = _splitmix64(base ^ np.uint64(epoch & _M64))
    keys = _splitmix64(np.arange(num_rows, dtype=np.uint64) ^ base[0])
    return np.argsort(keys, kind="stable")


class BatchIterator:
    """Iterator of batch dicts (see ``packing.py`` for the keys, all ``[batch_size, S]`` numpy arrays).

    Args:
        packed: the packed rows.
        batch_size: rows per batch on this process.
        seed: fixes the order of every epoch.
        shuffle: False visits rows in order (evaluation).
        num_epochs: stop after this many epochs; None repeats forever.
        drop_remainder: see the module docstring.
        process_index, process_count: this process's slice (``jax.process_index()``, ``jax.process_count()``).
    """

    def __init__(self, packed: Packed, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        self.packed = packed
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.drop_remainder = drop_remainder
        self.process_index = process_index
        self.process_count = process_count
        self.global_batch_size = batch_size * process_count
        n = len(packed)
        g = self.global_batch_size
        self.steps_per_epoch = n // g if drop_remainder else -(-n // g)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} packed rows are fewer than one global batch of {g} "
                             f"({batch_size} x {process_count} processes); use drop_remainder=False or less")
        self.epoch = 0
        self.step = 0
        self._perm_epoch = None
        self._perm = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.packed)
            self._perm = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def batch_rows(self, epoch: int, step: int) -> np.ndarray:
        """Row indices [batch_size] int64 of this process at (epoch, step); -1 marks a padding row."""
        order = self._order(epoch)
        lo = (step * self.process_count + self.process_index) * self.batch_size
        idx = np.arange(lo, lo + self.batch_size)
        return np.where(idx < order.size, order[np.minimum(idx, order.size - 1)], -1)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        rows = self.batch_rows(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return self.packed.batch(rows)

    def state(self) -> dict[str, Any]:
        """Where the iterator is: enough to resume exactly (JSON-able)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_rows": len(self.packed),
                "global_batch_size": self.global_batch_size}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``; refuses a state from a different seed, data size or global batch."""
        for key, mine in (("seed", self.seed), ("num_rows", len(self.packed)),
                          ("global_batch_size", self.global_batch_size)):
            if key in state and state[key] != mine:
                raise ValueError(f"cannot restore: state has {key}={state[key]}, this iterator has {mine}")
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise ValueError(f"cannot restore: step {step} outside [0, {self.steps_per_epoch}) or epoch {epoch} < 0")
        self.epoch, self.step = epoch, step
