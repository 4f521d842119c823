"""The BEAM models' dense layers on CPU: decode-sized products through packed weights.

At decode every dense projection (qkv, o, dense MLPs, the LM head) multiplies a few rows by a whole matrix, so its
time is the time to read the matrix. vLLM-CPU runs them through oneDNN (`onednn_mm`), about 25 GB/s on the 2-core
Zen 4 where a plain read gets 35-45, and 2-10 GB/s on an AVX2-only processor (no native bfloat16). So on a processor
with AVX2 or AVX512-BF16, the BEAM models' bfloat16 linear layers keep a packed copy of their weight (`pack_weight`:
the layout of `beam_jax.rows_matmul.pack_weight`, made from vLLM's [N, K] weight) and multiply up to `ROWS_MAX` rows
by it (32 with vdpbf16ps; 64 with the extension's AMX build, whose tile product is 1.04-1.18x vLLM's own AMX products
from 1 to 64 rows and slower at prefill sizes; 1 where vLLM uses AMX and the extension does not; every row count on
the AVX2 build, 1.5-6.8x vLLM's there) with the project's C++ extension
(`beam_jax._ffi.packed_rows_matmul`, the kernel of `beam_jax.generate`'s projections); more rows (prefill) and
everything else go to vLLM's own method. The packed copy is made before vLLM prepares its oneDNN handle, so both
exist: about 4% more memory for Qwen3-30B-A3B. ``BEAM_JAX_PACKED=0`` in the environment turns it off (read when
the model is built).

In eager execution (`enforce_eager`) `apply` branches on the row count in Python. Under torch.compile (vLLM's default
on CPU: one graph traced once for every batch size, guards dropped) a Python branch on the symbolic row count would be
fixed at the size it was traced with, so the layer becomes one opaque custom op, ``beam_jax::packed_linear``, which
makes the same choice when it runs (the packed product, or vLLM's own method for the layer, reached through a
registry of the packed layers); its fake implementation gives the graph the output's shape.

`use_packed_linears(model)` swaps each eligible layer's quant method (`UnquantizedLinearMethod`,
`UnquantizedEmbeddingMethod` for the LM head) for a subclass that does this, before the weights are loaded.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F

from convert.vllm_plugin.ops import register_cpu_op

ROWS_MAX_AVX512 = 32  # beam_jax.rows_matmul.ROWS_MAX_BF16_DP: past it the product is compute-bound either way
# The extension's AMX build (Intel Sapphire Rapids and later) multiplies on AMX tiles as vLLM's own products do (oneDNN;
# sgl's kernel for small N): measured on the 2-core Xeon at Qwen3-30B-A3B's shapes, 1.04-1.18x vLLM's product from 1
# to 64 rows (0.97x once, 256 columns at 32 rows), 0.74-0.92x at 512 (bench/results/linear_rows_xeon_amx.md,
# `bench/linear_rows.py`)
ROWS_MAX_AMX_TILES = 64
# vLLM on AMX and the extension on its AVX512-BF16 build (BEAM_JAX_CPU_ISA=avx512bf16): the vdpbf16ps product wins
# only for a single row (1 row 1.07-1.17x vLLM's, 2 rows 0.94-1.14x, 8 rows 0.44-0.57x; same table's last column)
ROWS_MAX_AMX = 1
# The extension's AVX2 build (AMD EPYC before Zen 4, older Intel): vLLM-CPU's bfloat16 products have no native bf16
# there (oneDNN about 2-10 GB/s), and the AVX2 packed loop was 1.5-6.8x faster than them at every row count measured,
# 1 to 512, in two runs on the 2-core Zen 3 EPYC (bench/results/linear_rows_amd_zen3_avx2.md, `bench/linear_rows.py`):
# every product takes it, prefill included
ROWS_MAX_AVX2 = 1 << 30


def _rows_max() -> int:
    """Rows up to which the packed product is taken on this processor: `ROWS_MAX_AMX_TILES` on the extension's AMX
    build, `ROWS_MAX_AVX2` on its AVX2 build, `ROWS_MAX_AMX` where only vLLM's products use AMX (its own check,
    `torch.cpu._is_amx_tile_supported`), else `ROWS_MAX_AVX512`."""
    ext = _ffi()
    if ext is not None and ext.cpu_isa() == "amx":
        return ROWS_MAX_AMX_TILES
    if ext is not None and ext.cpu_isa() == "avx2":
        return ROWS_MAX_AVX2
    return ROWS_MAX_AMX if torch.cpu._is_amx_tile_supported() else ROWS_MAX_AVX512


PACK_COLS = 32  # kPackedCols in ffi/masked_moe.h
CALLS = [0]  # packed products run in this process (the tests read it)


@functools.cache
def _ffi():
    """beam_jax's C++ extension when it has the packed product and runs its AVX2, AVX512-BF16 or AMX build, else
    None."""
    try:
        from beam_jax import _ffi as ext
    except ImportError:
        return None
    from beam_jax.cpu_isas import PACKED_ISAS

    return ext if hasattr(ext, "packed_rows_matmul") and ext.cpu_isa() in PACKED_ISAS else None


ROWS_MAX = _rows_max()  # read when a product runs: the tests set it


def packing_enabled() -> bool:
    """Whether the BEAM models pack their dense layers here: the extension's AVX2, AVX512-BF16 or AMX build, unless
    ``BEAM_JAX_PACKED=0``."""
    return os.environ.get("BEAM_JAX_PACKED") != "0" and _ffi() is not None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """vLLM's weight [N, K] bfloat16 (K even) -> packed [ceil(N / 32), K / 2, 32, 2], contiguous: packed[b, p, c] =
    (weight[32b + c, 2p], weight[32b + c, 2p + 1]), zeros past row N (`beam_jax.rows_matmul.pack_weight` of w =
    weight.T)."""
    if weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.shape[1] % 2:
        raise ValueError(f"pack_weight: weight must be [N, K] bfloat16 with K even, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    blocks = -(-N // PACK_COLS)
    w = F.pad(weight.detach(), (0, 0, 0, blocks * PACK_COLS - N))
    return w.reshape(blocks, PACK_COLS, K // 2, 2).permute(0, 2, 1, 3).contiguous()


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bfloat16 @ the packed weight of n output features (+ bias) -> [..., n] bfloat16, float32
    accumulation, one rounding (`F.linear(x, weight, bias)` up to summation order)."""
    ffi = _ffi()
    K = packed.shape[1] * 2
    if ffi is None:
        raise RuntimeError("packed_matmul: beam_jax._ffi has no AVX2, AVX512-BF16 or AMX packed_rows_matmul here")
    if x.dtype != torch.bfloat16 or x.shape[-1] != K or x.device.type != "cpu":
        raise ValueError(f"packed_matmul: x must be [..., {K}] bfloat16 on the CPU, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty((x2.shape[0], n), dtype=torch.bfloat16)
    CALLS[0] += 1
    ffi.packed_rows_matmul(x2.data_ptr(), x2.shape[0], K, packed.data_ptr(), n, y.data_ptr(),
                           torch.get_num_threads())
    if bias is not None:
        y += bias.to(y.dtype)
    return y.reshape(*lead, n)


_LAYERS: list = []  # layer id -> (weakref to the layer, weakref to its packed method): the op's way back to vLLM's


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, layer_id: int,
                  n: int) -> torch.Tensor:
    """The packed layers' product as one operation for torch.compile: x [..., K] bfloat16 -> [..., n] bfloat16;
    up to `ROWS_MAX` rows `packed_matmul(x, packed, n, bias)`, more rows vLLM's own method for layer `layer_id`."""
    if _rows(x) <= ROWS_MAX:
        return packed_matmul(x, packed, n, bias)
    layer, method = (ref() for ref in _LAYERS[layer_id])
    if layer is None or method is None:
        raise RuntimeError(f"beam_jax::packed_linear: packed layer {layer_id} no longer exists")
    return method.base_apply(layer, x, bias)


def _packed_linear_fake(x, packed, bias, layer_id, n):
    return x.new_empty((*x.shape[:-1], n))


register_cpu_op(packed_linear, _packed_linear_fake)  # torch.ops.beam_jax.packed_linear


def _eligible(layer) -> bool:
    w = getattr(layer, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype == torch.bfloat16 and w.device.type == "cpu"
            and w.shape[1] % 2 == 0 and not getattr(layer, "_cpu_skip_gemm_dispatch", False))


def _packed_method(base: type) -> type:
    """`base` (vLLM's unquantized linear or embedding method) with the packed decode path."""

    class Packed(base):
        def process_weights_after_loading(self, layer) -> None:
            if _eligible(layer):
                layer.beam_packed = pack_weight(layer.weight)  # before vLLM may drop the weight for oneDNN's
                layer.beam_packed_n = int(layer.weight.shape[0])
                layer.beam_layer_id = len(_LAYERS)
                _LAYERS.append((weakref.ref(layer), weakref.ref(self)))
            super().process_weights_after_loading(layer)

        def base_apply(self, layer, x, bias=None):
            """vLLM's own method."""
            return super().apply(layer, x, bias)

        def apply(self, layer, x, bias=None):
            packed = getattr(layer, "beam_packed", None)
            if packed is None or x.dtype != torch.bfloat16 or x.shape[-1] != packed.shape[1] * 2:
                return super().apply(layer, x, bias)
            if torch.compiler.is_compiling():  # the row count is symbolic: decide when the graph runs
                return torch.ops.beam_jax.packed_linear(x, packed, bias, layer.beam_layer_id, layer.beam_packed_n)
            if _rows(x) <= ROWS_MAX:
                return packed_matmul(x, packed, layer.beam_packed_n, bias)
            return super().apply(layer, x, bias)

    Packed.__name__ = Packed.__qualname__ = "BeamPacked" + base.__name__
    return Packed


@functools.cache
def _methods() -> dict:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return {UnquantizedLinearMethod: _packed_method(UnquantizedLinearMethod),
            UnquantizedEmbeddingMethod: _packed_method(UnquantizedEmbeddingMethod)}


def use_packed_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Give every unquantized linear layer of `model` (and its LM head, not the input embedding) the packed decode
    path, when `dtype` (the model's) is bfloat16, the platform is the CPU and `packing_enabled()`. Call before the
    weights are loaded. Returns how many layers took it."""
    from vllm.platforms import current_platform

    if dtype != torch.bfloat16 or not current_platform.is_cpu() or not packing_enabled():
        return 0
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    methods, n = _methods(), 0
    for module in model.modules():
        if isinstance(module, (LinearBase, ParallelLMHead)):
            packed = methods.get(type(getattr(module, "quant_method", None)))
            if packed is not None:
                module.quant_method = packed()
                n += 1
    return n
