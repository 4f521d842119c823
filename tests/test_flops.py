"""Tests for beam_jax.flops: expert counts on hand-made keep masks, the formulas on published model sizes,
and the matmul counts checked against XLA's own cost analysis of the same products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax import flops as F
from beam_jax import policies as P


def _xla_flops(fn, *shapes):
    """FLOPs XLA counts for fn on float32 inputs of the given shapes (skips if the backend has no count)."""
    args = [jnp.ones(s, jnp.float32) for s in shapes]
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or "flops" not in cost:
        pytest.skip("this backend reports no FLOP count")
    return cost["flops"]


# ----------------------------------------------------------------------------- expert counts


def test_experts_per_token_hand_values():
    keep = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_allclose(F.experts_per_token(keep), 1.0)
    np.testing.assert_allclose(F.experts_per_token(keep, jnp.array([1, 1, 0], bool)), 1.5)
    np.testing.assert_allclose(F.experts_per_token(keep, jnp.array([0.0, 0.0, 1.0])), 0.0)
    assert F.experts_per_token(keep, jnp.zeros(3, bool)) == 0
    # leading batch dims and float masks
    np.testing.assert_allclose(F.experts_per_token(keep.astype(jnp.float32)[None].repeat(2, 0)), 1.0)


def test_experts_per_token_per_layer():
    l0 = jnp.array([[1, 1], [1, 1]], bool)
    l1 = jnp.array([[1, 0], [0, 0]], bool)
    np.testing.assert_allclose(F.experts_per_token_per_layer([l0, l1]), [2.0, 0.5])
    np.testing.assert_allclose(F.experts_per_token_per_layer(jnp.stack([l0, l1]), jnp.array([False, True])), [2.0, 0.0])


def test_reduction_from_a_policy_keep_mask():
    weights = jnp.array([[0.0625, 0.5, 0.25, 0.1875], [0.25, 0.25, 0.25, 0.25]], jnp.float32)
    keep = P.dynamic_skip_keep(weights, 0.5)  # 2 kept, then all 4 kept
    k_eff = F.experts_per_token(keep)
    np.testing.assert_allclose(k_eff, 3.0)
    np.testing.assert_allclose(F.moe_flops_reduction(k_eff, 4), 0.25)
    np.testing.assert_allclose(F.moe_flops_reduction(0.56, 4), 0.86)  # the paper's Qwen1.5-MoE point
    assert F.moe_flops_reduction(4, 4) == 0


# ----------------------------------------------------------------------------- formulas on real model sizes


def test_routed_and_shared_expert_flops():
    # Mixtral-8x7B: d 4096, expert width 14336, K 2
    assert F.routed_expert_flops(2, 4096, 14336) == 2 * 6 * 4096 * 14336
    assert F.routed_expert_flops(0.5, 4096, 14336) == 0.5 * 6 * 4096 * 14336
    # Qwen1.5-MoE-A2.7B: one shared expert of width 5632 with a sigmoid gate
    assert F.shared_expert_flops(2048, 5632, gated=True) == 6 * 2048 * 5632 + 2 * 2048
    # DeepSeek-V2-Lite: two shared experts of width 1408
    assert F.shared_expert_flops(2048, 1408, num_shared=2) == 2 * 6 * 2048 * 1408


def test_router_flops():
    assert F.router_flops(4096, 8) == {"router": 65536, "mask_router": 65536}
    assert F.router_flops(2048, 60, mask_router=False) == {"router": 2 * 2048 * 60, "mask_router": 0}


def test_attention_flops_gqa_hand_values():
    # Mixtral: d 4096, 32 heads, 8 KV heads, head_dim 128
    a = F.attention_flops(4096, 32, 8, 128, seq_len=1000, causal=False)
    assert a["proj"] == 2 * 4096 * (4096 + 1024 + 1024) + 2 * 4096 * 4096
    assert a["scores"] == 2 * 2 * 32 * 128 * 1000
    # causal prefill of 1000 tokens attends (1000 + 1) / 2 keys on average
    assert F.attention_flops(4096, 32, 8, 128, seq_len=1000)["scores"] == 2 * 2 * 32 * 128 * 500.5


def test_mla_flops_deepseek_v2_lite_hand_values():
    a = F.mla_attention_flops(2048, 16, 512, 128, 64, 128, seq_len=10, causal=False)
    proj = 2 * 2048 * 16 * 192 + 2 * 2048 * (512 + 64) + 2 * 512 * 16 * (128 + 128) + 2 * 16 * 128 * 2048
    assert a["proj"] == proj
    assert a["scores"] == 10 * (2 * 16 * 192 + 2 * 16 * 128)
    with_q_lora = F.mla_attention_flops(2048, 16, 512, 128, 64, 128, seq_len=10, q_lora_rank=1536, causal=False)
    assert with_q_lora["proj"] - proj == 2 * 2048 * 1536 + 2 * 1536 * 16 * 192 - 2 * 2048 * 16 * 192


# ----------------------------------------------------------------------------- the same counts from XLA


def test_routed_expert_flops_match_xla():
    d, f = 48, 80

    def swiglu_matmuls(x, wg, wu, wd, h):  # one token, one expert: the three projections
        return x @ wg, x @ wu, h @ wd

    assert _xla_flops(swiglu_matmuls, (1, d), (d, f), (d, f), (f, d), (1, f)) == F.routed_expert_flops(1, d, f)


def test_gqa_attention_flops_match_xla():
    d, H, Hkv, hd, S = 64, 4, 2, 16, 24

    def proj(x, wq, wk, wv, wo, o):
        return x @ wq, x @ wk, x @ wv, o @ wo

    def scores(q, k, v, a):  # one query over S cached keys, kv heads repeated to H
        return jnp.einsum("hd,shd->hs", q, k), jnp.einsum("hs,shd->hd", a, v)

    want = F.attention_flops(d, H, Hkv, hd, S, causal=False)
    assert _xla_flops(proj, (1, d), (d, H * hd), (d, Hkv * hd), (d, Hkv * hd), (H * hd, d), (1, H * hd)) == want["proj"]
    assert _xla_flops(scores, (H, hd), (S, H, hd), (S, H, hd), (H, S)) == want["scores"]


def test_mla_attention_flops_match_xla():
    d, H, r, nope, rope, v, S = 64, 4, 24, 16, 8, 12, 10

    def proj(x, wq, wkva, latent, wkvb, o, wo):
        return x @ wq, x @ wkva, latent @ wkvb, o @ wo

    def scores(q, k, a, vv):
        return jnp.einsum("hd,shd->hs", q, k), jnp.einsum("hs,shd->hd", a, vv)

    want = F.mla_attention_flops(d, H, r, nope, rope, v, S, causal=False)
    shapes = [(1, d), (d, H * (nope + rope)), (d, r + rope), (1, r), (r, H * (nope + v)), (1, H * v), (H * v, d)]
    assert _xla_flops(proj, *shapes) == want["proj"]
    assert _xla_flops(scores, (H, nope + rope), (S, H, nope + rope), (H, S), (S, H, v)) == want["scores"]


# ----------------------------------------------------------------------------- the breakdown


def test_layer_flops_keeps_every_part_separate():
    attn = F.attention_flops(2048, 16, 16, 128, 512)
    out = F.layer_flops(0.56, 4, 2048, 1408, 60, shared=F.shared_expert_flops(2048, 5632, gated=True), attention=attn)
    assert set(out) == {
        "routed_experts",
        "routed_experts_topk",
        "moe_flops_reduction",
        "shared_experts",
        "router",
        "mask_router",
        "attention_proj",
        "attention_scores",
    }
    assert out["routed_experts"] == F.routed_expert_flops(0.56, 2048, 1408)
    np.testing.assert_allclose(out["moe_flops_reduction"], 0.86)
    np.testing.assert_allclose(out["routed_experts"] / out["routed_experts_topk"], 1 - out["moe_flops_reduction"])
    assert "attention_proj" not in F.layer_flops(1, 2, 64, 128, 8)


def test_flops_functions_jit():
    keep = jnp.array([[1, 0], [1, 1]], bool)
    k = jax.jit(F.experts_per_token)(keep)
    np.testing.assert_allclose(jax.jit(F.routed_expert_flops, static_argnums=(1, 2))(k, 8, 16), 1.5 * 6 * 8 * 16)


def test_decode_step_flops_hand_values():
    from ml_collections import ConfigDict

    from beam_jax.config import config_from_arch
    from beam_jax.configs import tiny_pretrain

    cfg = config_from_arch(ConfigDict(tiny_pretrain.get_config().model.arch.to_dict()))
    d, L, E, K, f, V = 192, 4, 32, 6, 96, 2048
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok,
            cfg.moe_intermediate_size, cfg.vocab_size) == (d, L, E, K, f, V)
    out = F.decode_step_flops(cfg, context=0)
    assert out["routed_experts"] == L * K * 6 * d * f == 2_654_208
    assert out["attention_proj"] == L * 2 * d * (2 * 6 * 32 + 2 * 2 * 32) == 786_432
    assert out["router"] == L * 2 * d * E and out["mask_router"] == 0 and out["attention_scores"] == 0
    assert out["lm_head"] == 2 * d * V and out["shared_experts"] == out["dense_mlp"] == 0
    assert out["total"] == 2_654_208 + 786_432 + L * 2 * d * E + 2 * d * V
    assert out["routed_share"] == pytest.approx(0.6207, abs=1e-4)  # the shipped base's criterion: >= 0.6
    ctx = F.decode_step_flops(cfg, context=64)
    assert ctx["attention_scores"] == L * 4 * 6 * 32 * 64 and ctx["routed_share"] < out["routed_share"]
    half = F.decode_step_flops(cfg, context=0, k_eff=3, mask_router=True)
    assert half["routed_experts"] == out["routed_experts"] / 2 and half["mask_router"] == half["router"]
