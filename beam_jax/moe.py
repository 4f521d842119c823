"""The one MoE block every family uses: router -> Top-K -> mask hook -> expert compute -> combine.

Families differ only in `ModelConfig` fields: softmax or sigmoid scores, Top-K renormalisation
(`norm_topk_prob`), DeepSeek-V2's group-limited Top-K, DeepSeek-V3's / GLM-4.5's bias-corrected group Top-K
(`noaux_tc`), the routed scaling factor, float32 router logits, and shared experts (with Qwen2-MoE's sigmoid
gate). The routing itself (`route`, `RouterSpec`) and the mask hooks, where BEAM and the comparison policies
act, live in `beam_jax.routing`; this module holds the block's parameters and calls them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .experts import EXPERT_PATHS
from .attention import packed_for, project
from .layers import INIT_STD, MLP, linear
from .routing import TOPK, LayerContext, MaskHook, RouterSpec, route


class RouterBias(nnx.Variable):
    """DeepSeek-V3's / GLM-4.5's `e_score_correction_bias` [E] float32: it only chooses experts (no gradient
    reaches it) and the base model's balancing rule, not the optimizer, sets it, so it is not an `nnx.Param`: no
    `train.trainable` set (and no weight decay) touches it. Loaded from and exported to the checkpoint."""


def swiglu(mlp: MLP, x):
    """`mlp(x)` for a SwiGLU `layers.MLP` with its projections through `attention.project` (the fast XLA:CPU
    path in bfloat16, the same arithmetic in float32). x [..., d] -> [..., d]."""
    return project(mlp.down_proj, jax.nn.silu(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))


class MaskRouterParam(nnx.Param):
    """BEAM's mask-router weights: a Param subtype, so training can select exactly these (`nnx.OfType`)."""


class MaskRouter(nnx.Module):
    """BEAM's mask router W_m: mask_logits = x @ kernel [(+ bias)], kernel [d, E] float32, zero-initialised
    (sigmoid(0) = 0.5 >= tau keeps every candidate, so training starts exactly at Top-K)."""

    def __init__(self, d: int, E: int, bias: bool = False):
        self.kernel = MaskRouterParam(jnp.zeros((d, E), jnp.float32))
        self.bias = MaskRouterParam(jnp.zeros((E,), jnp.float32)) if bias else None

    def __call__(self, x):
        """x [T, d] (any float dtype) -> mask logits [T, E] float32."""
        out = x.astype(jnp.float32) @ self.kernel[...]
        return out if self.bias is None else out + self.bias[...]

    def at(self, x, expert_ids):
        """The mask logits at the candidates: x [T, d] (any float dtype), expert_ids [T, K] int -> [T, K] float32,
        `take_along_axis(self(x), expert_ids, -1)` (its reference). Inside `beam_jax.generate` (a transposed copy of
        the kernel listed by `attention.packed_weights`) and with T * K < E, only the K rows of that copy each token
        uses are read: a decode step's T * K * d floats instead of the whole d x E kernel (Qwen3-30B-A3B at batch 1:
        64 KB instead of 1 MB per layer; XLA:CPU's product reads the kernel at a fraction of the bandwidth)."""
        kernel_t = packed_for(self)  # [E, d] float32
        ids = expert_ids.astype(jnp.int32)
        if kernel_t is None or ids.size >= kernel_t.shape[0]:
            return jnp.take_along_axis(self(x), ids, axis=-1)
        out = jnp.einsum("td,tkd->tk", x.astype(jnp.float32), kernel_t[ids])
        return out if self.bias is None else out + self.bias[...][ids]


class Experts(nnx.Module):
    """Routed experts' SwiGLU weights, stacked: w_gate, w_up [E, d, f]; w_down [E, f, d]."""

    def __init__(self, E: int, d: int, f: int, *, dtype, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        init = nnx.initializers.normal(INIT_STD)
        self.w_gate = nnx.Param(init(rngs.params(), (E, d, f), param_dtype))
        self.w_up = nnx.Param(init(rngs.params(), (E, d, f), param_dtype))
        self.w_down = nnx.Param(init(rngs.params(), (E, f, d), param_dtype))

    def __call__(self, x, ids, weights, keep=None, impl: str = "reference"):
        """impl: an `experts.EXPERT_PATHS` name, or "kernel" for `beam_jax.masked_moe` (the FFI kernel where it
        is built: dropped pairs cost nothing, forward and, on CPU, backward; within `beam_jax.generate` on the AMX and
        AVX512-BF16 builds, bfloat16, `packed_experts.masked_moe_packed` on the copy `generate.decode_packs` made)."""
        if impl == "kernel" and x.dtype == jnp.bfloat16:
            from .packed_experts import PackedExperts, masked_moe_packed

            packed = packed_for(self)  # inside beam_jax.generate (AMX, AVX512-BF16): the experts packed once
            if isinstance(packed, PackedExperts):
                return masked_moe_packed(x, packed, ids, weights.astype(jnp.float32), keep)
        wg, wu, wd = (p[...].astype(x.dtype) for p in (self.w_gate, self.w_up, self.w_down))
        if impl == "kernel":
            from .kernel import masked_moe

            return masked_moe(x, wg, wu, wd, ids, weights.astype(jnp.float32), keep)
        w = weights.astype(jnp.promote_types(weights.dtype, x.dtype))
        return EXPERT_PATHS[impl](x, wg, wu, wd, ids, w, keep)


@dataclasses.dataclass
class MoEOutput:
    """Per-layer routing record, [B, S, ...]: router_logits [.., E]; topk_ids, topk_weights (the hook's final
    weights), keep (None: every candidate computed), kept bool and m_hat float32 (None but for BEAM) [.., K]
    (see `routing.MaskResult`)."""

    router_logits: jax.Array
    topk_ids: jax.Array
    topk_weights: jax.Array
    keep: jax.Array | None
    kept: jax.Array
    m_hat: jax.Array | None


jax.tree_util.register_dataclass(MoEOutput, data_fields=["router_logits", "topk_ids", "topk_weights", "keep",
                                                         "kept", "m_hat"], meta_fields=[])


class MoEBlock(nnx.Module):
    """x [B, S, d] -> (y [B, S, d], MoEOutput)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, *, dtype, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        d, E = cfg.hidden_size, cfg.num_experts
        self.layer_idx = layer_idx
        self.mask_router = MaskRouter(d, E)
        self.spec = RouterSpec.from_config(cfg)
        self.router_float32 = cfg.router_float32
        router_dtype = jnp.float32 if cfg.router_float32 else dtype
        self.gate = linear(d, E, dtype=router_dtype, param_dtype=jnp.float32 if cfg.router_float32 else param_dtype,
                           rngs=rngs)
        if cfg.topk_method == "noaux_tc":  # HF: mlp.gate.e_score_correction_bias
            self.gate.e_score_correction_bias = RouterBias(jnp.zeros((E,), jnp.float32))
        self.experts = Experts(E, d, cfg.moe_intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        shared = cfg.shared_expert_intermediate_size
        self.shared_experts = (MLP(d, shared, bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                               if shared else None)
        self.shared_expert_gate = (linear(d, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                   if shared and cfg.shared_expert_gate else None)

    def router_logits(self, xt):
        """xt [T, d] -> [T, E], in the router's dtype (float32 for DeepSeek, else the model dtype)."""
        if self.router_float32:
            xt = xt.astype(jnp.float32)
        return project(self.gate, xt)

    def __call__(self, x, mask_hook: MaskHook = TOPK, impl: str = "reference"):
        B, S, d = x.shape
        xt = x.reshape(B * S, d)
        logits = self.router_logits(xt)
        bias = getattr(self.gate, "e_score_correction_bias", None)
        weights, ids, _ = route(logits, self.spec, None if bias is None else bias[...])
        res = mask_hook(LayerContext(self.mask_router, self.spec, self.layer_idx), xt, logits, weights, ids)
        y = self.experts(xt, ids, res.weights, res.keep, impl)
        if self.shared_experts is not None:
            shared = swiglu(self.shared_experts, xt)
            if self.shared_expert_gate is not None:
                shared = jax.nn.sigmoid(project(self.shared_expert_gate, xt)) * shared
            y = y + shared
        per_pair = lambda a: None if a is None else a.reshape(B, S, -1)  # noqa: E731
        rec = MoEOutput(logits.reshape(B, S, -1), ids.reshape(B, S, -1), per_pair(res.weights), per_pair(res.keep),
                        per_pair(res.kept), per_pair(res.m_hat))
        return y.reshape(B, S, d), rec
