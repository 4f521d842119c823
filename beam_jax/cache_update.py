"""The KV cache write of `beam_jax.generate` on CPU, in place.

Each call of the model writes its S new keys and values into the cache at the current slot:
``lax.dynamic_update_slice_in_dim(cache, update, index, axis=1)``. XLA:CPU (jaxlib 0.10) normalizes a bfloat16 or
float16 dynamic-update-slice to float32 (its float support keeps only some ops in the low-precision type), so that
write became a conversion of the whole cache to float32, the update, and a conversion back: every decode step read
and wrote all L slots of every layer's cache (0.06 ms per layer's k or v at batch 8 and 128 slots on the Qwen3-shaped
model of `bench/serve.py`, growing with batch and context). The CPU FFI target ``beam_cache_update``
(``ffi/cache_update_cpu.cc``) writes the S slots into the cache's own buffer (its output aliases the cache operand).

    cache_update(cache [B, L, ...], update [B, S, ...], index) -> the cache with update at [index, index + S)

Same result as `lax.dynamic_update_slice_in_dim` on axis 1 (its reference; a negative start counts from L and the
start is clamped to [0, L - S] the same way), compared in tests/test_cache_update.py. `use_cache_update(dtype)` says
where `attention._update_cache` sends the write here: the CPU backend, the target built, a bfloat16 or float16 cache
(float32 updates in place already), and ``BEAM_JAX_CACHE_UPDATE`` not "0" (read at trace time). Forward only (the
cache is written in inference).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from beam_jax import kernel

__all__ = ["cache_update", "cache_update_available", "use_cache_update", "reference_cache_update"]

_TARGET = "beam_cache_update"
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # the ones XLA:CPU upcasts


def cache_update_available() -> bool:
    """Whether this build of the extension has the CPU target (an older build does not)."""
    return kernel._ffi is not None and _TARGET in kernel._ffi.registrations()


def use_cache_update(dtype) -> bool:
    """Whether `attention._update_cache` writes a cache of `dtype` through the target: the CPU backend, the target
    built, bfloat16 or float16, and ``BEAM_JAX_CACHE_UPDATE`` not "0"."""
    return (jnp.dtype(dtype) in _DTYPES and os.environ.get("BEAM_JAX_CACHE_UPDATE") != "0"
            and jax.default_backend() == "cpu" and cache_update_available())


def reference_cache_update(cache, update, index):
    """XLA's own write: `lax.dynamic_update_slice_in_dim` on axis 1."""
    return jax.lax.dynamic_update_slice_in_dim(cache, update, index, axis=1)


def cache_update(cache, update, index):
    """cache [B, L, ...], update [B, S, ...] (S <= L, the cache's dtype), index: int scalar (the first slot; a
    negative one counts from L, as in lax; clamped to [0, L - S]) -> the cache with update at slots
    [index, index + S), written in the cache's buffer by the CPU target."""
    if cache.ndim < 2 or update.ndim != cache.ndim or update.shape[0] != cache.shape[0] \
            or update.shape[1] > cache.shape[1] or update.shape[2:] != cache.shape[2:]:
        raise ValueError(f"cache_update: update must be [B, S, ...] with S <= L against cache [B, L, ...]; got cache "
                         f"{tuple(cache.shape)}, update {tuple(update.shape)}")
    if update.dtype != cache.dtype:
        raise TypeError(f"cache_update: update must be the cache's dtype {cache.dtype}, got {update.dtype}")
    if not cache_update_available():
        raise RuntimeError("cache_update: the beam_jax._ffi extension has no beam_cache_update target (rebuild it: "
                           "pip install -e .)")
    index = jnp.asarray(index, jnp.int32)
    if index.ndim:
        raise ValueError(f"cache_update: index must be a scalar, got shape {tuple(index.shape)}")
    index = jnp.where(index < 0, index + cache.shape[1], index)  # lax's dynamic_update_slice wraps a negative start
    return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(cache.shape, cache.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")(cache, update, index)
