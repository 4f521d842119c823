"""Transparent huge pages (2 MiB) under the large CPU arrays a decode step streams: the weights.

A decode step on the CPU reads every weight it uses once, so it runs at the memory's read rate, and that rate is
higher over 2 MiB pages than over 4 KiB ones (fewer TLB misses, hardware prefetch runs further before a page
boundary stops it). Measured on a 2-core AMD EPYC (Zen 4; `bench/hugepages_ab.py`, the two kinds of pages
alternated in one process): a two-thread read of 768 MB 0-14% faster, `beam_jax.generate`'s Qwen3-shaped decode
step 1-6% faster (medians of four rounds at batch 1 and 8, Top-K and 0.15 kept; 22 of 28 pairs faster over two
runs). XLA's CPU buffers come from `malloc` on 4 KiB pages, and Linux gives huge pages to anonymous memory only
where it is asked to (the default ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise``).

`collapse` asks for them on the 2 MiB-aligned interior of each large buffer: ``madvise(MADV_HUGEPAGE)`` (later
faults and the kernel's background `khugepaged` use huge pages there) and ``madvise(MADV_COLLAPSE)`` (Linux 6.1+:
the kernel copies the range into huge pages now, contents unchanged; about 2 s for 2.6 GB on these VMs). Nothing
changes where the kernel refuses (huge pages ``never``, an older kernel, memory too fragmented): the arrays stay
as they were. ``BEAM_JAX_HUGEPAGES=0`` turns it off. `beam_jax.generate` calls `collapse_once` on the model's
state and its packed weights, once per model.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from pathlib import Path

import jax

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
PAGE = 2 << 20  # x86-64's transparent huge page
MIN_BYTES = 2 * PAGE  # smaller arrays may hold no aligned 2 MiB page; a step streams the large ones
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_madvise = None
_DONE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # owner -> ids of the arrays collapsed for it


def available() -> bool:
    """Linux with transparent huge pages not ``never``, and not turned off by ``BEAM_JAX_HUGEPAGES=0``."""
    if os.environ.get("BEAM_JAX_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        return "[never]" not in THP_ENABLED.read_text()
    except OSError:
        return False


def _libc_madvise():
    global _madvise
    if _madvise is None:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        _madvise = fn
    return _madvise


def aligned_interior(address: int, nbytes: int, page: int = PAGE) -> tuple[int, int]:
    """(start, length) of the whole `page`-aligned pages inside [address, address + nbytes); length 0 if none."""
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    return start, max(end - start, 0)


def _cpu_buffers(x, min_bytes: int):
    """(address, nbytes) of each buffer of at least `min_bytes` of the jax.Array x on a CPU device."""
    if not isinstance(x, jax.Array) or x.nbytes < min_bytes or x.is_deleted():
        return []
    x.block_until_ready()  # an array still being written (a copy dispatched, not done) is refused, EAGAIN/EINVAL
    out = []
    for shard in x.addressable_shards:
        if shard.device.platform == "cpu" and shard.data.nbytes >= min_bytes:
            try:
                out.append((shard.data.unsafe_buffer_pointer(), shard.data.nbytes))
            except Exception:  # an array whose buffer has no plain address (none seen on CPU): left as it is
                continue
    return out


def collapse_buffer(address: int, nbytes: int) -> int:
    """Huge pages under the 2 MiB-aligned interior of [address, address + nbytes) (memory this process owns and
    keeps mapped). -> bytes now in huge pages by MADV_COLLAPSE (0 where unavailable or refused)."""
    return _collapse_range(address, nbytes) if available() else 0


def _collapse_range(address: int, nbytes: int) -> int:
    """`collapse_buffer` once `available()` was checked."""
    madvise = _libc_madvise()
    start, length = aligned_interior(address, nbytes)
    if length == 0 or madvise(start, length, MADV_HUGEPAGE) != 0:
        return 0
    if madvise(start, length, MADV_COLLAPSE) == 0:
        return length
    # a refusal of the whole range (EAGAIN: a page busy for a moment) leaves the pages it did collapse; page by
    # page, two tries each, moves all the kernel lets move
    return PAGE * sum(any(madvise(page, PAGE, MADV_COLLAPSE) == 0 for _ in range(2))
                      for page in range(start, start + length, PAGE))


def collapse(tree, min_bytes: int | None = None) -> int:
    """Back every CPU buffer of at least `min_bytes` (default `MIN_BYTES`) among the jax.Array leaves of `tree`
    with huge pages (module docstring). -> bytes now in huge pages by MADV_COLLAPSE (0 where unavailable or
    refused). The arrays' values are not touched."""
    if not available():
        return 0
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    return sum(_collapse_range(address, nbytes) for leaf in jax.tree.leaves(tree)
               for address, nbytes in _cpu_buffers(leaf, min_bytes))


def collapse_once(owner, tree, min_bytes: int | None = None) -> int:
    """`collapse(tree)` unless the same arrays were collapsed for `owner` (weakly held: a model) already, so a
    caller on every call pays the walk over the leaves only; arrays replaced since (new weights) are collapsed."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    ids = {id(x) for x in leaves}
    seen = _DONE.get(owner)
    if seen is not None and ids <= seen:
        return 0
    new = [x for x in leaves if seen is None or id(x) not in seen]
    done = collapse(new, min_bytes)
    _DONE[owner] = ids
    return done
