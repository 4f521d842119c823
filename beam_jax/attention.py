"""Attention: grouped-query attention (Mixtral, Qwen-MoE, OLMoE) and multi-head latent attention
(DeepSeek-V2), both with an optional preallocated KV cache.

Shapes: hidden x [B, S, d]; positions [B, S] int32. A KV cache layer is a dict
``{"k": [B, L, Hkv, Dk], "v": [B, L, Hkv, Dv]}`` (MLA caches the expanded per-head keys and values);
the caller passes the shared ``AttentionContext`` with the write index and which slots are valid.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .cache_update import cache_update, reference_cache_update, use_cache_update
from .config import ModelConfig
from .decode_attention import decode_attention, use_decode_attention
from .layers import RMSNorm, apply_rope, linear
from .rows_matmul import packed_rows_matmul, rows_matmul, use_packed_rows_matmul, use_rows_matmul


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What every layer's attention needs besides its input.

    cos, sin   [B, S, rotary_dim/2] float32 rotary tables for the query positions
    kv_valid   [B, L] bool: which key slots hold real tokens (L = S without a cache)
    q_slot     [S] int32: the slot each query occupies (for the causal and sliding-window masks)
    index      int32 scalar: where this call's keys are written in the cache (0 without a cache)
    fresh      static bool: the cache held no token before this call (a prefill into `init_cache`'s zeros, index 0):
               attention reads this call's S keys alone, not the cache's L slots (the other L - S are empty)
    """

    cos: jax.Array
    sin: jax.Array
    kv_valid: jax.Array
    q_slot: jax.Array
    index: jax.Array
    fresh: bool = False


jax.tree_util.register_dataclass(AttentionContext, data_fields=["cos", "sin", "kv_valid", "q_slot", "index"],
                                 meta_fields=["fresh"])

# Queries per block of a fresh prefill's causal attention (`attend`): block j reads keys [0, its last slot] only, so
# the products skip most of the masked upper triangle (512 queries: 5/8 of the full square).
CAUSAL_BLOCK = 128


def matmul(x, w, *, transpose_w: bool = False):
    """x [..., din] @ w [din, dout] (or w [dout, din] with transpose_w) -> [..., dout] in x.dtype.

    float32 goes straight to `jnp.matmul`. Lower precisions are multiplied with float32 accumulation
    (`preferred_element_type`) and, for a single row, padded to two rows: XLA:CPU (jaxlib 0.10) runs a bf16 dot
    with a bf16 result, and any bf16 matrix-vector product, through a scalar loop at about 0.5 GB/s, 20x
    slower than its library path (measured on the 2-core EPYC: a [1, 2048] x [2048, 4096] bf16 product
    30 ms, the same product as two rows with a float32 result 1.6 ms). On the CPU a few rows (decode) go
    to `beam_jax.rows_matmul`, which streams w at memory bandwidth. The result is the exact product
    rounded once to x.dtype.
    """
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return jnp.matmul(x, w.T if transpose_w else w)
    lead, din = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, din)
    rows = x2.shape[0]
    if not transpose_w and x.dtype == w.dtype and use_rows_matmul(rows, x.dtype):  # decode: stream w once
        return rows_matmul(x2, w).reshape(*lead, w.shape[-1])
    if rows == 1:
        x2 = jnp.concatenate([x2, x2], axis=0)
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    y = jax.lax.dot_general(x2, w, dims, preferred_element_type=jnp.float32)[:rows]
    return y.astype(x.dtype).reshape(*lead, y.shape[-1])


# id(module) -> its packed copy (nnx.Linear: rows_matmul.PackedWeight of its kernel; moe.Experts:
# packed_experts.PackedExperts), while `beam_jax.generate` traces (`packed_weights`)
_PACKED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("beam_jax_packed_weights", default=None)


# whether `attend` sends one-query attention to the decode-attention kernel (`decode_kernels`)
_DECODE: contextvars.ContextVar[bool] = contextvars.ContextVar("beam_jax_decode_kernels", default=False)


@contextlib.contextmanager
def packed_weights(by_module: dict):
    """Within the block, `project` multiplies a few bfloat16 rows by the packed copy of a listed layer's kernel
    (`by_module`: id(nnx.Linear) -> `rows_matmul.PackedWeight`; `beam_jax.generate` packs them once per model), and
    `moe.Experts` with impl="kernel" runs on a listed `packed_experts.PackedExperts`."""
    token = _PACKED.set(by_module)
    try:
        yield
    finally:
        _PACKED.reset(token)


def packed_for(module):
    """The packed copy listed for `module` by the enclosing `packed_weights` block, or None."""
    return (_PACKED.get() or {}).get(id(module))


@contextlib.contextmanager
def decode_kernels():
    """Within the block (`beam_jax.generate`'s tracing), `attend` runs a single query per sequence on the CPU
    decode-attention kernel (`beam_jax.decode_attention`, forward only) where `use_decode_attention` allows it."""
    token = _DECODE.set(True)
    try:
        yield
    finally:
        _DECODE.reset(token)


def project(lin: nnx.Linear, x):
    """`lin(x)` for an `nnx.Linear` (kernel [din, dout], optional bias) through `matmul`: same result in
    float32, the fast XLA:CPU path in bfloat16 / float16. x [..., din] -> [..., dout] in lin.dtype.
    Inside `packed_weights`, a listed layer's product with bfloat16 rows (up to `rows_matmul.packed_rows_max()`: a
    few on the AVX512-BF16 and AVX2 builds, any number on the AMX build) uses its packed kernel."""
    dtype = lin.dtype or x.dtype
    packed = packed_for(lin)
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    if packed is not None and jnp.dtype(dtype) == jnp.bfloat16 and use_packed_rows_matmul(rows):
        y = packed_rows_matmul(x.astype(dtype).reshape(rows, x.shape[-1]), packed).reshape(*x.shape[:-1], packed.n)
    else:
        y = matmul(x.astype(dtype), lin.kernel[...].astype(dtype))
    if lin.bias is not None:
        y = y + lin.bias[...].astype(dtype)
    return y


def _update_cache(cache, k, v, ctx: AttentionContext):
    """Write this call's k, v [B, S, Hkv, D] into the cache at ctx.index. -> (the keys and values attention reads:
    the whole cache, or with `ctx.fresh` this call's own in the cache's dtype; the new cache or None)."""
    if cache is None:
        return (k, v), None
    k, v = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
    write = cache_update if use_cache_update(k.dtype) else reference_cache_update  # in place on CPU
    kc = write(cache["k"], k, ctx.index)
    vc = write(cache["v"], v, ctx.index)
    return (k, v) if ctx.fresh else (kc, vc), {"k": kc, "v": vc}


def allowed_slots(ctx: AttentionContext, L: int, sliding_window: int | None = None):
    """[B, S, L] bool: which of the key slots 0 .. L-1 each query may attend to (causal, valid, inside the sliding
    window). L may be less than kv_valid's width (a fresh prefill reads its own S keys)."""
    kv_slot = jnp.arange(L)
    allowed = kv_slot[None, :] <= ctx.q_slot[:, None]  # [S, L] causal
    if sliding_window is not None:
        allowed &= kv_slot[None, :] > ctx.q_slot[:, None] - sliding_window
    return allowed[None, :, :] & ctx.kv_valid[:, None, :L]


def attend(q, k, v, ctx: AttentionContext, scale: float, sliding_window: int | None = None):
    """Softmax attention with causal, padding and optional sliding-window masks.

    q [B, S, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv] -> [B, S, H, Dv] in q.dtype.
    Scores and softmax in float32, probabilities cast back to the value dtype (as transformers' eager path), value
    sums in float32, rounded once to q.dtype.
    Inside `decode_kernels`, one query per sequence (S = 1) goes to `beam_jax.decode_attention` (same result;
    this function's own path is its reference).
    """
    B, S, H, _ = q.shape
    L = k.shape[1]
    allowed = allowed_slots(ctx, L, sliding_window)  # [B, S, L]
    if S == 1 and _DECODE.get() and q.dtype == k.dtype == v.dtype and use_decode_attention(q.dtype):
        return decode_attention(q[:, 0], k, v, allowed[:, 0], scale)[:, None]
    if ctx.fresh and S > CAUSAL_BLOCK:
        # keys are this call's own (slot s = query s): the queries of a block see no key past the block's last slot
        return jnp.concatenate([_attend(q[:, lo:lo + CAUSAL_BLOCK], k[:, :lo + CAUSAL_BLOCK], v[:, :lo + CAUSAL_BLOCK],
                                        allowed[:, lo:lo + CAUSAL_BLOCK, :lo + CAUSAL_BLOCK], scale)
                                for lo in range(0, S, CAUSAL_BLOCK)], axis=1)
    return _attend(q, k, v, allowed, scale)


def _attend(q, k, v, allowed, scale: float):
    """`attend`'s products: q [B, S, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv], allowed [B, S, L] bool ->
    [B, S, H, Dv] in q.dtype."""
    B, S, H, _ = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    G, Dk, Dv, f32 = H // Hkv, q.shape[-1], v.shape[-1], jnp.float32
    # One product per KV head over its G * S query rows, in float32 (the products of bf16 inputs are exact there):
    # XLA:CPU ran the grouped einsums on bf16 operands 2x slower, and the value sum with a bf16 result 2.7x
    # (512 x 512 tokens, 32 / 4 heads of 128, the 2-core Xeon: 40 + 24 ms against 20 + 9).
    qh = q.reshape(B, S, Hkv, G, Dk).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * S, Dk).astype(f32)
    scores = jnp.einsum("bkqd,bkld->bkql", qh, k.transpose(0, 2, 1, 3).astype(f32)).reshape(B, Hkv, G, S, L) * scale
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).astype(f32).reshape(B, Hkv, G * S, L)
    out = jnp.einsum("bkql,bkld->bkqd", probs, v.transpose(0, 2, 1, 3).astype(f32))  # float32 value sums
    return out.reshape(B, Hkv, G, S, Dv).transpose(0, 3, 1, 2, 4).reshape(B, S, H, Dv).astype(q.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k RMSNorm (per head: Qwen3; whole projection: OLMoE)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        d, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = linear(d, H * D, bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = linear(d, Hkv * D, bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.v_proj = linear(d, Hkv * D, bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = linear(H * D, d, bias=cfg.o_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, param_dtype)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, param_dtype)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(H * D, cfg.rms_norm_eps, dtype, param_dtype)
            self.k_norm = RMSNorm(Hkv * D, cfg.rms_norm_eps, dtype, param_dtype)

    def __call__(self, x, ctx: AttentionContext, cache=None):
        cfg = self.cfg
        B, S, _ = x.shape
        q, k, v = project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.reshape(B, S, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(B, S, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(B, S, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, ctx.cos, ctx.sin, cfg.rope_interleaved)
        k = apply_rope(k, ctx.cos, ctx.sin, cfg.rope_interleaved)
        (k, v), cache = _update_cache(cache, k, v, ctx)
        out = attend(q, k, v, ctx, cfg.attention_scale, cfg.sliding_window)
        return project(self.o_proj, out.reshape(B, S, -1)), cache


class MLAttention(nnx.Module):
    """DeepSeek-V2 multi-head latent attention: low-rank q (optional) and a compressed shared KV latent."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        if cfg.q_lora_rank is None:
            self.q_proj = linear(d, H * cfg.qk_head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.q_a_proj = linear(d, cfg.q_lora_rank, bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype, param_dtype)
            self.q_b_proj = linear(cfg.q_lora_rank, H * cfg.qk_head_dim, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.kv_a_proj_with_mqa = linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.qkv_bias,
                                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, dtype, param_dtype)
        self.kv_b_proj = linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.o_proj = linear(H * cfg.v_head_dim, d, bias=cfg.o_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, ctx: AttentionContext, cache=None):
        cfg = self.cfg
        B, S, _ = x.shape
        H, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            q = project(self.q_proj, x)
        else:
            q = project(self.q_b_proj, self.q_a_layernorm(project(self.q_a_proj, x)))
        q = q.reshape(B, S, H, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        ckv = project(self.kv_a_proj_with_mqa, x)
        kv_latent, k_pe = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank:]
        kv = project(self.kv_b_proj, self.kv_a_layernorm(kv_latent)).reshape(B, S, H, nope + cfg.v_head_dim)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, cfg.rope_interleaved)
        k_pe = apply_rope(k_pe.reshape(B, S, 1, rope), ctx.cos, ctx.sin, cfg.rope_interleaved)
        q = jnp.concatenate([q_nope, q_pe], -1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe, (B, S, H, rope))], -1)
        (k, v), cache = _update_cache(cache, k, v, ctx)
        out = attend(q, k, v, ctx, cfg.attention_scale, cfg.sliding_window)
        return project(self.o_proj, out.reshape(B, S, -1)), cache
