"""Small shared layers: linear, RMSNorm, rotary embeddings, the SwiGLU MLP.

Parameters follow Flax conventions (`kernel` is [in, out], the transpose of a PyTorch `weight`) and are
stored in `param_dtype` (float32 master weights for training) while activations run in `dtype`, with float32 where
Hugging Face computes in float32 (RMSNorm statistics, rotary tables, softmax), so float32 parity is exact to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig, rope_frequencies

INIT_STD = 0.02  # transformers' initializer_range default


def linear(din: int, dout: int, *, bias: bool = False, dtype=jnp.float32, param_dtype=None,
           rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear with HF's normal(0.02) init; kernel [din, dout] in param_dtype, computed in dtype."""
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype or dtype,
                      kernel_init=nnx.initializers.normal(INIT_STD), rngs=rngs)


class RMSNorm(nnx.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in float32, result in x.dtype times weight."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32, param_dtype=None):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype or dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x [..., d] -> [..., d]."""

    def __init__(self, d: int, f: int, *, bias: bool = False, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        self.gate_proj = linear(d, f, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up_proj = linear(d, f, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.down_proj = linear(f, d, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(cfg: ModelConfig, positions):
    """positions [B, S] int -> (cos, sin) [B, S, rotary_dim // 2] float32 (already times the yarn scaling)."""
    inv_freq, scaling = rope_frequencies(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(freqs) * scaling, jnp.sin(freqs) * scaling


def apply_rope(x, cos, sin, interleaved: bool):
    """x [B, S, H, D]; cos/sin [B, S, R/2] with R <= D rotary dims (R < D: partial rotary, the first R dims
    rotate). Rotate-half layout (Llama) or interleaved pairs (DeepSeek).

    Rotate-half runs in x.dtype like transformers' `apply_rotary_pos_emb` (cos/sin cast first);
    interleaved runs in float32 like DeepSeek's complex multiply, then casts back.
    """
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:  # partial rotary (GLM-4.5): the first `rot` dims rotate, the rest pass unchanged
        return jnp.concatenate([apply_rope(x[..., :rot], cos, sin, interleaved), x[..., rot:]], -1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleaved:
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
        a, b = xf[..., 0], xf[..., 1]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
        return out.astype(x.dtype)
    cos = jnp.concatenate([cos, cos], -1).astype(x.dtype)
    sin = jnp.concatenate([sin, sin], -1).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))
