"""FLOPs accounting for routed-expert sparsity, as pure functions. All counts are per token per layer and
count a multiply-add as 2 FLOPs; norms, activations, softmax, RoPE and biases are left out.

The headline is the routed-expert reduction only:

    K_eff = number of kept Top-K candidates of a token      (from a keep mask [T, K])
    routed-expert FLOPs = K_eff * 2 * 3 * d * f             (SwiGLU: gate, up, down projections)
    reduction = 1 - mean(K_eff) / K

Shared experts, attention and the routers (main router + BEAM's mask router) are reported as separate
entries and never folded into that number. The functions take Python numbers or jax scalars/arrays.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = [
    "experts_per_token",
    "experts_per_token_per_layer",
    "moe_flops_reduction",
    "routed_expert_flops",
    "shared_expert_flops",
    "router_flops",
    "attention_flops",
    "mla_attention_flops",
    "layer_flops",
    "decode_step_flops",
]


def experts_per_token(keep, valid=None):
    """Mean K_eff: keep [..., T, K] bool/0-1, valid [..., T] optional -> float32 scalar, averaged over all
    (valid) tokens of all leading dims; 0 when there is no valid token."""
    k_eff = jnp.sum(keep.astype(jnp.float32), axis=-1)
    w = jnp.ones_like(k_eff) if valid is None else jnp.broadcast_to(valid.astype(jnp.float32), k_eff.shape)
    n = jnp.sum(w)
    return jnp.where(n > 0, jnp.sum(k_eff * w) / jnp.where(n > 0, n, 1), 0.0)


def experts_per_token_per_layer(keep, valid=None):
    """Mean K_eff per layer: keep [L, T, K] (or a list of L [T, K]), valid [T] optional -> float32 [L]."""
    keep = jnp.stack(list(keep)) if isinstance(keep, (list, tuple)) else keep
    return jnp.stack([experts_per_token(keep[i], valid) for i in range(keep.shape[0])])


def moe_flops_reduction(mean_k_eff, K):
    """Fraction of routed-expert FLOPs saved against Top-K: 1 - mean_k_eff / K."""
    return 1 - mean_k_eff / K


def routed_expert_flops(k_eff, d, f):
    """Routed SwiGLU experts: k_eff * 2 * 3 * d * f (d model width, f expert intermediate width)."""
    return k_eff * 2 * 3 * d * f


def shared_expert_flops(d, f, num_shared=1, gated=False):
    """Always-on shared experts: num_shared SwiGLU experts of width f (6 d f each), plus 2 d for a
    sigmoid gate on their output when gated (Qwen1.5/Qwen2-MoE's ``shared_expert_gate``).
    DeepSeek-V2-Lite: f = moe_intermediate_size, num_shared = n_shared_experts; Qwen1.5-MoE: f =
    shared_expert_intermediate_size, num_shared = 1, gated = True."""
    return num_shared * 6 * d * f + (2 * d if gated else 0)


def router_flops(d, num_experts, mask_router=True):
    """{"router": 2 d E, "mask_router": 2 d E (BEAM's W_m) or 0}: the two [d -> E] linear maps."""
    return {"router": 2 * d * num_experts, "mask_router": 2 * d * num_experts if mask_router else 0}


def _context(seq_len, causal):
    """Keys attended per token: the mean over a causal prefill of length seq_len is (seq_len + 1) / 2;
    causal=False attends seq_len keys (use it for one decode step with seq_len cached positions)."""
    return (seq_len + 1) / 2 if causal else seq_len


def attention_flops(d, num_heads, num_kv_heads, head_dim, seq_len, causal=True):
    """Standard multi-head / grouped-query attention, per token.

    proj:   q and o (d <-> num_heads * head_dim), k and v (d -> num_kv_heads * head_dim)
    scores: q k^T and the weighted sum of v, 2 * 2 * num_heads * head_dim per attended key
    -> {"proj": ..., "scores": ...}; see `_context` for seq_len / causal.
    """
    q = num_heads * head_dim
    kv = num_kv_heads * head_dim
    proj = 2 * d * (2 * q + 2 * kv)
    scores = 4 * num_heads * head_dim * _context(seq_len, causal)
    return {"proj": proj, "scores": scores}


def mla_attention_flops(
    d, num_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, seq_len, q_lora_rank=None, causal=True
):
    """DeepSeek-V2 multi-head latent attention, per token, in its plain (non-absorbed) form as transformers
    runs it: each token's latent is expanded once by kv_b_proj.

    proj:   q (q_proj d -> H (nope + rope), or q_a_proj d -> q_lora_rank then q_b_proj when q_lora_rank),
            kv_a_proj_with_mqa (d -> kv_lora_rank + rope), kv_b_proj (kv_lora_rank -> H (nope + v)),
            o_proj (H v -> d)
    scores: q k^T over nope + rope dims and the weighted sum over v dims, per attended key
    -> {"proj": ..., "scores": ...}. DeepSeek-V2-Lite: d 2048, H 16, kv_lora_rank 512, nope 128,
    rope 64, v 128, no q_lora_rank.
    """
    H, qk = num_heads, qk_nope_head_dim + qk_rope_head_dim
    if q_lora_rank is None:
        q_proj = 2 * d * H * qk
    else:
        q_proj = 2 * d * q_lora_rank + 2 * q_lora_rank * H * qk
    kv_proj = 2 * d * (kv_lora_rank + qk_rope_head_dim) + 2 * kv_lora_rank * H * (qk_nope_head_dim + v_head_dim)
    proj = q_proj + kv_proj + 2 * H * v_head_dim * d
    scores = 2 * H * (qk + v_head_dim) * _context(seq_len, causal)
    return {"proj": proj, "scores": scores}


def layer_flops(k_eff, top_k, d, d_expert, num_experts, shared=0, attention=None, mask_router=True):
    """Per-token per-layer breakdown, every part separate:

    k_eff mean kept experts, top_k the model's K, d_expert the routed experts' width, shared the result
    of `shared_expert_flops` (0 if none), attention a dict from `attention_flops` / `mla_attention_flops`
    (None: left out) -> dict with routed_experts, routed_experts_topk, moe_flops_reduction (the headline),
    shared_experts, router, mask_router and, when given, attention_proj and attention_scores.
    """
    out = {
        "routed_experts": routed_expert_flops(k_eff, d, d_expert),
        "routed_experts_topk": routed_expert_flops(top_k, d, d_expert),
        "moe_flops_reduction": moe_flops_reduction(k_eff, top_k),
        "shared_experts": shared,
        **router_flops(d, num_experts, mask_router),
    }
    if attention is not None:
        out.update({f"attention_{k}": v for k, v in attention.items()})
    return out


def decode_step_flops(cfg, context: int, k_eff=None, mask_router: bool = False) -> dict:
    """Weight and attention FLOPs of decoding one token of a whole model, summed over its layers.

    cfg: a `beam_jax.config.ModelConfig`; context: cached positions the token attends to; k_eff: mean kept
    experts per MoE layer (None: Top-K). -> {"routed_experts", "shared_experts", "dense_mlp", "router",
    "mask_router", "attention_proj", "attention_scores", "lm_head", "total", "routed_share"}, routed_share =
    routed_experts / total (the issue-12 criterion for the shipped base: >= 0.6 at Top-K).
    """
    d, K = cfg.hidden_size, cfg.num_experts_per_tok
    k = K if k_eff is None else k_eff
    if cfg.attention == "mla":
        att = mla_attention_flops(d, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                                  cfg.qk_rope_head_dim, cfg.v_head_dim, context, cfg.q_lora_rank, causal=False)
    else:
        att = attention_flops(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, context,
                              causal=False)
    out = dict.fromkeys(("routed_experts", "shared_experts", "dense_mlp", "router", "mask_router",
                         "attention_proj", "attention_scores"), 0.0)
    for moe in cfg.moe_layers:
        out["attention_proj"] += att["proj"]
        out["attention_scores"] += att["scores"]
        if moe:
            out["routed_experts"] += routed_expert_flops(k, d, cfg.moe_intermediate_size)
            if cfg.shared_expert_intermediate_size:
                out["shared_experts"] += shared_expert_flops(d, cfg.shared_expert_intermediate_size,
                                                             gated=cfg.shared_expert_gate)
            r = router_flops(d, cfg.num_experts, mask_router)
            out["router"] += r["router"]
            out["mask_router"] += r["mask_router"]
        else:
            out["dense_mlp"] += 6 * d * cfg.intermediate_size
    out["lm_head"] = 2 * d * cfg.vocab_size
    out["total"] = sum(out.values())
    out["routed_share"] = out["routed_experts"] / out["total"]
    return out
