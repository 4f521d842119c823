"""The one MoE block every family uses: router -> Top-K -> mask hook -> expert compute -> combine.

Families differ only in `ModelConfig` fields: softmax or sigmoid scores, Top-K renormalisation
(`norm_topk_prob`), DeepSeek-V2's group-limited Top-K, DeepSeek-V3's / GLM-4.5's bias-corrected group Top-K
(`noaux_tc`), the routed scaling factor, float32 router logits, and shared experts (with Qwen2-MoE's sigmoid
gate). The mask hook is where BEAM (and the comparison policies) act: it receives the router
outputs and returns which (token, expert) pairs are kept and their final weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .experts import EXPERT_PATHS
from .attention import project
from .layers import INIT_STD, MLP, linear


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """The routing arithmetic of a family (pure data; see `route`)."""

    top_k: int
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RouterSpec":
        return cls(cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.topk_method,
                   cfg.n_group, cfg.topk_group, cfg.scoring_func)


def _group_mask(group_scores, topk_group: int, experts_per_group: int):
    """group_scores [T, G] -> [T, G * experts_per_group] bool: the experts of each token's topk_group best groups."""
    T, G = group_scores.shape
    _, top_groups = jax.lax.top_k(group_scores, topk_group)
    mask = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], top_groups].set(True)
    return jnp.repeat(mask, experts_per_group, axis=1)


def route(router_logits, spec: RouterSpec, score_bias=None):
    """Scores over all experts (softmax or sigmoid), Top-K, optional renormalisation and scaling.

    router_logits [T, E] (any float dtype); score_bias [E] float32 (`noaux_tc` only: DeepSeek-V3's
    `e_score_correction_bias`) -> (weights [T, K] float32, expert_ids [T, K] int32, probs [T, E] float32 scores).
    Candidates are sorted by descending weight.
    - greedy: the K highest scores.
    - group_limited_greedy (DeepSeek-V2): only experts of the `topk_group` groups with the highest max score.
    - noaux_tc (DeepSeek-V3, GLM-4.5): `scores + score_bias` choose; groups are ranked by the sum of their two
      highest biased scores; the weights are the unbiased scores of the chosen experts.
    """
    logits = router_logits.astype(jnp.float32)
    probs = jax.nn.sigmoid(logits) if spec.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    T, E = probs.shape
    per_group = E // spec.n_group
    if spec.topk_method == "noaux_tc":
        choice = probs if score_bias is None else probs + score_bias.astype(jnp.float32)
        group_scores = jax.lax.top_k(choice.reshape(T, spec.n_group, per_group), 2)[0].sum(-1)
        choice = jnp.where(_group_mask(group_scores, spec.topk_group, per_group), choice, -jnp.inf)
        _, ids = jax.lax.top_k(choice, spec.top_k)
        weights = jnp.take_along_axis(probs, ids, axis=-1)
        order = jnp.argsort(-weights, axis=-1, stable=True)
        weights, ids = jnp.take_along_axis(weights, order, -1), jnp.take_along_axis(ids, order, -1)
    else:
        scores = probs
        if spec.topk_method == "group_limited_greedy":
            group_scores = probs.reshape(T, spec.n_group, per_group).max(-1)
            scores = jnp.where(_group_mask(group_scores, spec.topk_group, per_group), probs, 0.0)
        weights, ids = jax.lax.top_k(scores, spec.top_k)
    if spec.norm_topk_prob:
        # sigmoid scores can all be ~0: DeepSeek-V3 adds 1e-20 to the denominator
        eps = 1e-20 if spec.scoring_func == "sigmoid" else 0.0
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + eps)
    weights = weights * spec.routed_scaling_factor
    return weights, ids.astype(jnp.int32), probs


# A mask hook: (block, x [T, d], router_logits [T, E], weights [T, K] f32, ids [T, K]) -> (keep [T, K] bool | None,
# weights [T, K], aux dict). `keep=None` means every candidate is kept (plain Top-K).
MaskHook = Callable[..., tuple]


def topk_hook(block, x, router_logits, weights, ids):
    """Plain Top-K: every candidate kept, weights unchanged."""
    return None, weights, {}


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
        is built: dropped pairs cost nothing, forward and, on CPU, backward)."""
        wg, wu, wd = (p[...].astype(x.dtype) for p in (self.w_gate, self.w_up, self.w_down))
        if impl == "kernel":
            from .kernel import masked_moe

            return masked_moe(x, wg, wu, wd, ids, weights.astype(jnp.float32), keep)
        w = weights.astype(jnp.promote_types(weights.dtype, x.dtype))
        return EXPERT_PATHS[impl](x, wg, wu, wd, ids, w, keep)


@dataclasses.dataclass
class MoEOutput:
    """Per-layer routing record. router_logits [T, E]; topk_ids / topk_weights / keep [T, K]."""

    router_logits: jax.Array
    topk_ids: jax.Array
    topk_weights: jax.Array
    keep: jax.Array | None
    aux: dict


jax.tree_util.register_dataclass(MoEOutput, data_fields=["router_logits", "topk_ids", "topk_weights", "keep",
                                                         "aux"], meta_fields=[])


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
        self.shared_experts = MLP(d, shared, bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if shared else None
        self.shared_expert_gate = linear(d, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if shared and cfg.shared_expert_gate \
            else None

    def router_logits(self, xt):
        """xt [T, d] -> [T, E], in the router's dtype (float32 for DeepSeek, else the model dtype)."""
        if self.router_float32:
            xt = xt.astype(jnp.float32)
        return project(self.gate, xt)

    def __call__(self, x, mask_hook: MaskHook = topk_hook, impl: str = "reference"):
        B, S, d = x.shape
        xt = x.reshape(B * S, d)
        logits = self.router_logits(xt)
        bias = getattr(self.gate, "e_score_correction_bias", None)
        weights, ids, _ = route(logits, self.spec, None if bias is None else bias[...])
        keep, weights, aux = mask_hook(self, xt, logits, weights, ids)
        y = self.experts(xt, ids, weights, keep, impl)
        if self.shared_experts is not None:
            shared = swiglu(self.shared_experts, xt)
            if self.shared_expert_gate is not None:
                shared = jax.nn.sigmoid(project(self.shared_expert_gate, xt)) * shared
            y = y + shared
        rec = MoEOutput(logits.reshape(B, S, -1), ids.reshape(B, S, -1), weights.reshape(B, S, -1),
                        None if keep is None else keep.reshape(B, S, -1), aux)
        return y.reshape(B, S, d), rec
