"""The decode-time projections on CPU: ``y = x @ w`` for a few rows of ``x``.

At decode time every dense projection (attention q/k/v/o, the LM head, dense MLPs) is a product of a
few rows of activations with a whole weight matrix, so its time is the time to read the matrix.
XLA:CPU (jaxlib 0.10) reads a bfloat16 matrix at about a third of the memory bandwidth in that
product (even through `attention.matmul`'s float32-accumulation path, its best). The FFI target
``beam_rows_matmul`` (``ffi/rows_matmul_cpu.cc``; the loop is the experts' weight-streaming loop of
``ffi/masked_moe_cpu_kernel.h``) streams the matrix once, row by row, split over XLA's intra-op
threads, for any number of rows (in groups that reuse each block of the matrix from cache: 8 rows in the AVX2
loop, up to 64 in the AVX512-BF16 one, which reads the matrix once for all of them).

    rows_matmul(x [M, K], w [K, N]) -> [M, N] in x.dtype

x and w share one dtype (float32, bfloat16 or float16); the product is accumulated in float32 and
rounded once, as `attention.matmul` does. Differentiable (a ``custom_vjp`` whose backward is XLA's
own products). `use_rows_matmul(rows, dtype)` says where `attention.matmul` sends a product here:
on the CPU backend, where the extension is built, for at most `rows_max(dtype)` rows (its lead shrinks with the
rows: the multiply-adds grow with them while the bytes read do not; on the 2-core Zen 4 EPYC the AVX512-BF16 build
measured 2.7-5.1x XLA at one row, 1.2-2.8x at eight and 1.2-1.8x at 32 on q, o and the LM head (0.75x on the
2 MB k/v projection, which XLA reads from cache in that benchmark), the AVX2 loop losing to XLA past eight there;
on the AVX2-only Zen 3 EPYC, whose XLA bf16 dot is slower, the AVX2 loop leads up to 32 rows; `python
bench/decode_proj.py` measures both), in bfloat16 and float16 only (float32 keeps XLA's products,
so float32 parity with transformers stays exact to rounding). ``BEAM_JAX_ROWS_MATMUL=0`` in the environment turns
it off (read at trace time).

`beam_jax.generate` multiplies by packed weights instead (`pack_weight`, `packed_rows_matmul`, target
``beam_packed_rows_matmul``): w laid out once as [ceil(N / 32), K / 2, 32, 2], so each 64-byte load is a vdpbf16ps
operand without the shuffle the [K, N] loop needs per load, and a thread streams one contiguous run; forward only,
bfloat16 only, fast under the AVX512-BF16 build and, without vdpbf16ps, under the AVX2 one (each 32-byte load split
into two f32 vectors by a shift and a mask; `packing_available`; the portable build implements the target as a
reference loop). The AMX build (Intel Sapphire Rapids and later; `beam_jax._ffi.cpu_isa() == "amx"`) runs the
packed product on AMX tiles, whose layout the packed one already is (each 16 pairs of rows of a block, two B tiles),
so a product's time stays that of reading w up to about 32 rows and it beats XLA's dot at prefill sizes too
(`packed_rows_max`). ``BEAM_JAX_PACKED=0`` turns the packing off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from beam_jax import kernel
from beam_jax.cpu_isas import DP_ISAS, PACKED_ISAS

__all__ = ["rows_matmul", "rows_matmul_available", "use_rows_matmul", "rows_max", "ROWS_MAX", "ROWS_MAX_BF16_DP",
           "ROWS_MAX_BF16_AVX2", "packed_rows_max", "use_packed_rows_matmul", "PACKED_ROWS_MAX_AMX",
           "PACKED_ROWS_MAX_AVX2", "DP_ISAS", "PACKED_ISAS",
           "DTYPES", "PackedWeight", "pack_weight", "packed_rows_matmul", "packing_available", "PACK_COLS"]

_TARGET = "beam_rows_matmul"
_PACKED_TARGET = "beam_packed_rows_matmul"
PACK_COLS = 32  # columns of one packed block (kPackedCols in ffi/masked_moe.h)
ROWS_MAX = 8  # the AVX2 loop (and float16 everywhere)
ROWS_MAX_BF16_DP = 32  # bfloat16 under the AVX512-BF16 build (vdpbf16ps)
# bfloat16 under the AVX2 build: XLA:CPU's bf16 dot there is slower still (1.4-7.2 GB/s on the 2-core Zen 3 EPYC), and
# the AVX2 loop led it on every shape at 16 and 32 rows too (1.1-2.3x; `bench/decode_proj.py`)
ROWS_MAX_BF16_AVX2 = 32
# `packed_rows_matmul` on the AMX build: tile products, ahead of XLA's dot at every row count measured (1-512 rows
# of Qwen3-30B-A3B's q projection on the 2-core Xeon: 0.79 ms at 1 and 8 rows, 1.0 at 32, 4.8 at 512, against XLA's
# 2.3-2.5 ms at 1-32 rows and 9.3 at 512), so prefill takes it too
PACKED_ROWS_MAX_AMX = 1 << 30
# `packed_rows_matmul` on the AVX2 build (no vdpbf16ps: each bf16 pair split into two f32 by a shift and a mask):
# ahead of XLA's dot on Qwen3-30B-A3B's q, k, o and LM head at every row count measured, 1-32 (the 2-core Zen 3
# EPYC, two runs: 1.2-7.8x; XLA:CPU reads bf16 at 1.4-7.2 GB/s there), and of the row-major AVX2 loop in 45 of 48
# cells, 0.81-2.3x (`bench/decode_proj.py`, bench/results/decode_proj_cpu_amd_zen3_avx2.json, README "Decoding on
# CPU")
PACKED_ROWS_MAX_AVX2 = 32
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # where attention.matmul uses it
_FFI_DTYPES = kernel.FFI_DTYPES  # what the target accepts


def rows_matmul_available() -> bool:
    """Whether this build of the extension has the CPU target (an older build does not)."""
    return kernel._ffi is not None and _TARGET in kernel._ffi.registrations()


def _isa() -> str | None:
    """The CPU kernel build selected now (`beam_jax._ffi.cpu_isa()`), None without the extension."""
    return kernel._ffi.cpu_isa() if kernel._ffi is not None else None


def rows_max(dtype) -> int:
    """The most rows `attention.matmul` sends to `rows_matmul` in `dtype`, for the CPU kernel build selected now
    (`beam_jax._ffi.cpu_isa()`, read at trace time)."""
    isa = _isa()
    if jnp.dtype(dtype) != jnp.bfloat16:
        return ROWS_MAX
    return ROWS_MAX_BF16_DP if isa in DP_ISAS else ROWS_MAX_BF16_AVX2 if isa == "avx2" else ROWS_MAX


def use_rows_matmul(rows: int, dtype) -> bool:
    """Whether `attention.matmul` sends a product of `rows` rows in `dtype` to `rows_matmul`."""
    return (0 < rows <= rows_max(dtype) and jnp.dtype(dtype) in DTYPES and os.environ.get("BEAM_JAX_ROWS_MATMUL") != "0"
            and jax.default_backend() == "cpu" and rows_matmul_available())


def packed_rows_max() -> int:
    """The most rows `attention.project` multiplies by a packed weight: any number on the AMX build
    (`PACKED_ROWS_MAX_AMX`), `PACKED_ROWS_MAX_AVX2` on the AVX2 build, else `rows_max(bfloat16)` (the vdpbf16ps
    loop's limit; read at trace time)."""
    return {"amx": PACKED_ROWS_MAX_AMX, "avx2": PACKED_ROWS_MAX_AVX2}.get(_isa()) or rows_max(jnp.bfloat16)


def use_packed_rows_matmul(rows: int) -> bool:
    """Whether `attention.project` multiplies `rows` bfloat16 rows by a layer's packed weight (where it has one)."""
    return (0 < rows <= packed_rows_max() and os.environ.get("BEAM_JAX_ROWS_MATMUL") != "0"
            and jax.default_backend() == "cpu" and rows_matmul_available())


def _check(x, w):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"rows_matmul: x must be [M, K] and w [K, N], got x {x.shape} and w {w.shape}")
    if x.dtype != w.dtype or jnp.dtype(x.dtype) not in _FFI_DTYPES:
        raise TypeError(f"rows_matmul: x and w must share one dtype of float32, bfloat16, float16; got x "
                        f"{x.dtype} and w {w.dtype}")


def _call(x, w):
    return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype),
                            vmap_method="sequential")(x, w)


@jax.custom_vjp
def _rows_matmul(x, w):
    return _call(x, w)


def _fwd(x, w):
    return _call(x, w), (x, w)


def _bwd(res, dy):
    x, w = res
    f32 = jnp.float32
    dx = jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())), preferred_element_type=f32).astype(x.dtype)
    dw = jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=f32).astype(w.dtype)
    return dx, dw


_rows_matmul.defvjp(_fwd, _bwd)


def rows_matmul(x, w):
    """x [M, K] @ w [K, N] -> [M, N] in x.dtype (float32 accumulation) on the CPU FFI target."""
    _check(x, w)
    if not rows_matmul_available():
        raise RuntimeError("rows_matmul: the beam_jax._ffi extension has no beam_rows_matmul target "
                           "(rebuild it: pip install -e .)")
    return _rows_matmul(x, w)


# ---- packed weights: the decode projections of `beam_jax.generate` -----------------------------------------------

@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PackedWeight:
    """A bfloat16 weight w [K, N] in the layout of the ``beam_packed_rows_matmul`` target:
    packed [ceil(N / 32), K / 2, 32, 2], where packed[b, p, c] = (w[2p, 32b + c], w[2p + 1, 32b + c]) (zeros past
    column N). Each block of 32 columns is one contiguous run, and every 64-byte load of it is a vdpbf16ps operand
    as it lies, so a product with 8 rows of x streams w at the rate of one row (`packed_rows_matmul`)."""

    packed: jax.Array
    k: int = field(metadata=dict(static=True))
    n: int = field(metadata=dict(static=True))

    @property
    def shape(self):
        return (self.k, self.n)


def packing_available() -> bool:
    """Whether `beam_jax.generate` packs its decode projections: the extension has the packed target and runs its
    AVX2, AVX512-BF16 or AMX build (`PACKED_ISAS`; the portable build implements the target only as a reference
    loop), on the CPU backend, unless ``BEAM_JAX_PACKED=0`` (read when called)."""
    return (os.environ.get("BEAM_JAX_PACKED") != "0" and jax.default_backend() == "cpu" and kernel._ffi is not None
            and _PACKED_TARGET in kernel._ffi.registrations() and _isa() in PACKED_ISAS)


def pack_weight(w) -> PackedWeight:
    """w [K, N] bfloat16 (K even) -> its `PackedWeight` (a copy: ceil(N / 32) * 32 * K elements)."""
    if w.ndim != 2 or w.dtype != jnp.bfloat16 or w.shape[0] % 2:
        raise ValueError(f"pack_weight: w must be [K, N] bfloat16 with K even, got {w.dtype} {tuple(w.shape)}")
    K, N = w.shape
    blocks = -(-N // PACK_COLS)
    wpad = jnp.pad(w, ((0, 0), (0, blocks * PACK_COLS - N)))
    packed = wpad.reshape(K // 2, 2, blocks, PACK_COLS).transpose(2, 0, 3, 1)
    return PackedWeight(packed, int(K), int(N))


def packed_rows_matmul(x, pw: PackedWeight):
    """x [M, K] bfloat16 @ the packed w [K, N] -> [M, N] bfloat16 (float32 accumulation, one rounding), on the CPU
    FFI target. Forward only (inference)."""
    if x.ndim != 2 or x.shape[1] != pw.k or x.dtype != jnp.bfloat16:
        raise ValueError(f"packed_rows_matmul: x must be [M, {pw.k}] bfloat16, got {x.dtype} {tuple(x.shape)}")
    return jax.ffi.ffi_call(_PACKED_TARGET, jax.ShapeDtypeStruct((x.shape[0], pw.n), x.dtype),
                            vmap_method="sequential")(x, pw.packed)
