"""Decode attention on CPU: one query per sequence against its KV cache, in one FFI call.

At a decode step each sequence has one new query and L cached keys and values. XLA:CPU (jaxlib 0.10) runs
`attention.attend`'s two batched products as small dots over [B, Hkv] with the cache transposed (and the values
converted to float32) first, every step: on the Qwen3-30B-A3B-shaped model of `bench/serve.py` about 0.45 ms
per layer at batch 8 with 64 slots, the largest cost of the step outside the weights. The FFI target
``beam_decode_attention`` (``ffi/decode_attention_cpu.cc``, the loop in ``ffi/decode_attention_cpu_kernel.h``)
reads the cache in place, once, in contiguous runs of slots, and only the slots a sequence may attend to
(`python bench/decode_attention.py` measures it against XLA and the bandwidth floor).

    decode_attention(q [B, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv], allowed [B, L] bool, scale)
        -> [B, H, Dv] in q.dtype

Same result as `attention.attend` for one query (its reference, compared in tests/test_decode_attention.py):
scores and softmax in float32 over the allowed slots, the probabilities rounded to the cache dtype, the value sum
in float32 rounded once. Forward only (inference): `beam_jax.generate` sends its decode steps here on the CPU
backend (`use_decode_attention`); ``BEAM_JAX_DECODE_ATTENTION=0`` in the environment turns it off (read at trace
time).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from beam_jax import kernel

__all__ = ["decode_attention", "decode_attention_available", "use_decode_attention"]

_TARGET = "beam_decode_attention"


def decode_attention_available() -> bool:
    """Whether this build of the extension has the CPU target (an older build does not)."""
    return kernel._ffi is not None and _TARGET in kernel._ffi.registrations()


def use_decode_attention(dtype) -> bool:
    """Whether `beam_jax.generate`'s decode steps send attention in `dtype` here: the CPU backend, the target
    built, a float dtype the target takes, and ``BEAM_JAX_DECODE_ATTENTION`` not "0"."""
    return (jnp.dtype(dtype) in kernel.FFI_DTYPES and os.environ.get("BEAM_JAX_DECODE_ATTENTION") != "0"
            and jax.default_backend() == "cpu" and decode_attention_available())


def decode_attention(q, k, v, allowed, scale: float):
    """q [B, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv] (one float dtype), allowed [B, L] bool (the slots each
    query may attend to), scale (float) -> [B, H, Dv] in q.dtype, on the CPU FFI target."""
    if q.ndim != 3 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"decode_attention: q must be [B, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, Dk = q.shape
    _, L, Hkv, _ = k.shape
    if k.shape != (B, L, Hkv, Dk) or v.shape[:3] != (B, L, Hkv) or Hkv == 0 or H % Hkv:
        raise ValueError(f"decode_attention: k must be [{B}, L, Hkv, {Dk}] and v [{B}, L, Hkv, Dv] with Hkv "
                         f"dividing {H}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if allowed.shape != (B, L) or allowed.dtype != jnp.bool_:
        raise ValueError(f"decode_attention: allowed must be [{B}, {L}] bool, got {allowed.dtype} "
                         f"{tuple(allowed.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in kernel.FFI_DTYPES:
        raise TypeError(f"decode_attention: q, k and v must share one dtype of float32, bfloat16, float16; got q "
                        f"{q.dtype}, k {k.dtype}, v {v.dtype}")
    if not decode_attention_available():
        raise RuntimeError("decode_attention: the beam_jax._ffi extension has no beam_decode_attention target "
                           "(rebuild it: pip install -e .)")
    out = jax.ShapeDtypeStruct((B, H, v.shape[-1]), q.dtype)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(q, k, v, allowed, scale=np.float32(scale))
