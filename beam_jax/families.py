"""The supported families: how each Hugging Face config maps to `ModelConfig`, and how each checkpoint's
tensor names map to this package's parameters. Both are data plus one small function per family.

Parameter paths are dotted paths in `MoECausalLM` (for example `layers.3.mlp.experts.w_gate`); `hf_name`
turns a module path into the family's HF module name. The leaf names, the transforms and the other candidate
names (fused-era checkpoints) are `beam_jax.weight_map`'s table, the one place the loaders, the HF export and
`convert.to_vllm` take names from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from .config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """One supported family, the only list of them: the torch BEAM classes (`convert.modeling_beam`), the vLLM
    plugin's architectures and the planner's published sizes are all derived from `FAMILIES`.

    architecture: HF causal-LM class name (config.json `architectures`); model_type: HF base `model_type`
    (the BEAM variant is `beam_<model_type>`); config_class: the transformers config class name; build: HF
    config -> ModelConfig; moe_prefix / shared_name: HF module names of the MoE block and the shared experts;
    expert_names: HF names of the (gate, up, down) projections of one expert in the per-expert layout;
    published: repository name -> the config class's keyword arguments (its config.json values), for
    `beam_jax.plan` to plan a run without the weights."""

    architecture: str
    model_type: str
    config_class: str
    build: Callable[[Any], ModelConfig]
    moe_prefix: str = "mlp"  # HF module name of the MoE block ("block_sparse_moe" for Mixtral)
    shared_name: str = "shared_experts"  # HF module name of the shared expert MLP
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # checkpoints carry multi-token-prediction layers after the last decoder layer (`model.layers.{L}...`,
    # DeepSeek-V3, GLM-4.5): not part of the causal LM, left unread as transformers does
    mtp_layers: bool = False
    published: Mapping[str, dict] = dataclasses.field(default_factory=dict, compare=False, hash=False)


def _common(c, architecture: str, **kw) -> dict:
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(c, "rope_theta", 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    yarn_keys = ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                 "attention_factor", "truncate")
    yarn = tuple(sorted((k, float(rope[k])) for k in yarn_keys if rope.get(k) is not None))
    if rope_type == "yarn" and "original_max_position_embeddings" not in dict(yarn):
        yarn = tuple(sorted(yarn + (("original_max_position_embeddings",
                                     float(c.max_position_embeddings)),)))
    eos = getattr(c, "eos_token_id", None)
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    out = dict(
        architecture=architecture,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        rms_norm_eps=float(c.rms_norm_eps),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        rope_theta=float(rope["rope_theta"]),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor") or 1.0),
        rope_yarn=yarn,
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 4096)),
        intermediate_size=getattr(c, "intermediate_size", 0) or 0,
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=eos,
        pad_token_id=getattr(c, "pad_token_id", None),
    )
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{architecture}: field 'hidden_act' is '{act}', only 'silu' (SwiGLU) is supported")
    out.update(kw)
    return out


def _sparse_step_layers(c) -> tuple[bool, ...]:
    only = set(getattr(c, "mlp_only_layers", None) or [])
    step = getattr(c, "decoder_sparse_step", 1) or 1
    return tuple(i not in only and c.num_experts > 0 and (i + 1) % step == 0 for i in range(c.num_hidden_layers))


def _sliding(c):
    if getattr(c, "use_sliding_window", True) is False:
        return None
    return getattr(c, "sliding_window", None)


def build_mixtral(c) -> ModelConfig:
    return ModelConfig(**_common(
        c, "MixtralForCausalLM", sliding_window=_sliding(c), moe_layers=(True,) * c.num_hidden_layers,
        num_experts=c.num_local_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.intermediate_size, norm_topk_prob=True))


def build_qwen2_moe(c) -> ModelConfig:
    return ModelConfig(**_common(
        c, "Qwen2MoeForCausalLM", qkv_bias=bool(getattr(c, "qkv_bias", True)), sliding_window=_sliding(c),
        moe_layers=_sparse_step_layers(c), num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob),
        shared_expert_intermediate_size=c.shared_expert_intermediate_size, shared_expert_gate=True))


def build_qwen3_moe(c) -> ModelConfig:
    bias = bool(getattr(c, "attention_bias", False))
    return ModelConfig(**_common(
        c, "Qwen3MoeForCausalLM", qkv_bias=bias, o_bias=bias, qk_norm="head", sliding_window=_sliding(c),
        moe_layers=_sparse_step_layers(c), num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob)))


def build_olmoe(c) -> ModelConfig:
    bias = bool(getattr(c, "attention_bias", False))
    return ModelConfig(**_common(
        c, "OlmoeForCausalLM", qkv_bias=bias, o_bias=bias, qk_norm="full", clip_qkv=getattr(c, "clip_qkv", None),
        moe_layers=(True,) * c.num_hidden_layers, num_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.intermediate_size,
        norm_topk_prob=bool(c.norm_topk_prob)))


def build_deepseek_v2(c) -> ModelConfig:
    E = c.n_routed_experts
    first_dense = c.first_k_dense_replace or 0
    return ModelConfig(**_common(
        c, "DeepseekV2ForCausalLM", attention="mla", qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias),
        head_dim=c.qk_rope_head_dim, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        rope_interleaved=True, moe_layers=tuple(i >= first_dense for i in range(c.num_hidden_layers)),
        num_experts=E, num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
        routed_scaling_factor=float(c.routed_scaling_factor), topk_method=c.topk_method or "greedy",
        n_group=c.n_group or 1, topk_group=c.topk_group or 1, router_float32=True,
        shared_expert_intermediate_size=c.moe_intermediate_size * (c.n_shared_experts or 0),
        mlp_bias=bool(getattr(c, "mlp_bias", False))))


def _noaux_tc(c) -> dict:
    """DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, bias-corrected group-limited Top-K, float32 router."""
    return dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=c.n_group or 1, topk_group=c.topk_group or 1,
                routed_scaling_factor=float(c.routed_scaling_factor), norm_topk_prob=bool(c.norm_topk_prob),
                router_float32=True, num_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
                moe_intermediate_size=c.moe_intermediate_size,
                moe_layers=tuple(i >= (c.first_k_dense_replace or 0) for i in range(c.num_hidden_layers)),
                shared_expert_intermediate_size=c.moe_intermediate_size * (c.n_shared_experts or 0))


def build_deepseek_v3(c) -> ModelConfig:
    """DeepSeek-V3 / R1, Kimi-K2: DeepSeek-V2's MLA with `noaux_tc` routing."""
    return ModelConfig(**_common(
        c, "DeepseekV3ForCausalLM", attention="mla", qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias),
        head_dim=c.qk_rope_head_dim, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        rope_interleaved=bool(getattr(c, "rope_interleave", True)), **_noaux_tc(c)))


def build_glm4_moe(c) -> ModelConfig:
    """GLM-4.5 / 4.5-Air: GQA with partial rotary (and optional per-head q/k norm), `noaux_tc` routing."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    return ModelConfig(**_common(
        c, "Glm4MoeForCausalLM", qkv_bias=bool(c.attention_bias), qk_norm="head" if c.use_qk_norm else "none",
        partial_rotary_factor=float(partial), **_noaux_tc(c)))


# Published config.json values (the architectures' Hugging Face repositories), for `beam_jax.plan` to plan a
# run without the weights: the transformers config class's keyword arguments.

MIXTRAL_8X7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
    rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
    attention_bias=False, use_sliding_window=False)
DEEPSEEK_V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
    routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707), rope_theta=10000.0)
QWEN1_5_MOE_A2_7B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
    decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=8192, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)
OLMOE_1B_7B = dict(
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
    rope_theta=10000.0, rms_norm_eps=1e-5, clip_qkv=None, norm_topk_prob=False, pad_token_id=1,
    eos_token_id=50279, bos_token_id=None, tie_word_embeddings=False)
# DeepSeek-V3 (DeepSeek-R1 has the same sizes, Kimi-K2 the same layout with its own); the MTP layer is not counted
DEEPSEEK_V3 = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
    n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
    v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
    first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, rope_interleave=True,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0), rope_theta=10000.0)
GLM_4_5_AIR = dict(
    vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_routed_experts=128,
    n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, norm_topk_prob=True, attention_bias=True, use_qk_norm=False,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5))


FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    Family("MixtralForCausalLM", "mixtral", "MixtralConfig", build_mixtral, moe_prefix="block_sparse_moe",
           expert_names=("w1", "w3", "w2"),
           published={"Mixtral-8x7B-v0.1": MIXTRAL_8X7B, "Mixtral-8x7B-Instruct-v0.1": MIXTRAL_8X7B}),
    Family("Qwen2MoeForCausalLM", "qwen2_moe", "Qwen2MoeConfig", build_qwen2_moe, shared_name="shared_expert",
           published={"Qwen1.5-MoE-A2.7B": QWEN1_5_MOE_A2_7B}),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", "Qwen3MoeConfig", build_qwen3_moe,
           published={"Qwen3-30B-A3B": QWEN3_30B_A3B}),
    Family("OlmoeForCausalLM", "olmoe", "OlmoeConfig", build_olmoe,
           published={"OLMoE-1B-7B-0924": OLMOE_1B_7B, "OLMoE-1B-7B-0125": OLMOE_1B_7B}),
    Family("DeepseekV2ForCausalLM", "deepseek_v2", "DeepseekV2Config", build_deepseek_v2,
           published={"DeepSeek-V2-Lite": DEEPSEEK_V2_LITE, "DeepSeek-V2-Lite-Chat": DEEPSEEK_V2_LITE}),
    Family("DeepseekV3ForCausalLM", "deepseek_v3", "DeepseekV3Config", build_deepseek_v3, mtp_layers=True,
           published={"DeepSeek-V3": DEEPSEEK_V3, "DeepSeek-V3-0324": DEEPSEEK_V3, "DeepSeek-R1": DEEPSEEK_V3}),
    Family("Glm4MoeForCausalLM", "glm4_moe", "Glm4MoeConfig", build_glm4_moe, mtp_layers=True,
           published={"GLM-4.5-Air": GLM_4_5_AIR, "GLM-4.5-Air-Base": GLM_4_5_AIR}),
)}


def family_for(architecture: str, source: str = "config.json") -> Family:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ConfigError(f"{source}: field 'architectures' is {architecture!r}; supported: "
                          f"{', '.join(sorted(FAMILIES))}") from None


def hf_name(family: Family, path: str, is_moe_layer: bool) -> str:
    """Our module path (a parameter path minus its leaf) -> the family's HF module path, e.g. `layers.0.mlp.gate`
    -> `model.layers.0.block_sparse_moe.gate` for Mixtral (`weight_map.modules` adds the in-memory name)."""
    if path.startswith("lm_head"):
        return path
    if is_moe_layer and ".mlp." in path:
        path = path.replace(".mlp.", f".{family.moe_prefix}.", 1)
        path = path.replace(".shared_experts.", f".{family.shared_name}.")
    return "model." + path


def published(name: str) -> tuple[Family, dict]:
    """A published repository name (e.g. `Qwen3-30B-A3B`) -> (its family, its config.json values). KeyError if
    no family lists it (`published_names()` are the known ones)."""
    for family in FAMILIES.values():
        if name in family.published:
            return family, dict(family.published[name])
    raise KeyError(name)


def published_names() -> list[str]:
    return sorted(n for f in FAMILIES.values() for n in f.published)
