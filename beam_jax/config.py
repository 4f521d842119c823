"""`ModelConfig`: one frozen dataclass describes every supported MoE family.

A family is configuration, not a subclass: `beam_jax.families` maps each Hugging Face architecture to a
function that reads its `config.json` (through `transformers.AutoConfig`, which already normalises
`rope_theta` into `rope_parameters` and validates field types) into this dataclass. Nothing in the model
branches on a family name; it branches on the fields below.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np


class ConfigError(ValueError):
    """A model or run configuration is invalid; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- identity
    architecture: str  # Hugging Face `architectures[0]`, e.g. "MixtralForCausalLM"
    vocab_size: int
    hidden_size: int  # d
    num_hidden_layers: int
    rms_norm_eps: float
    tie_word_embeddings: bool = False

    # --- attention
    attention: Literal["gqa", "mla"] = "gqa"
    num_attention_heads: int = 1
    num_key_value_heads: int = 1
    head_dim: int = 0  # per-head width of q/k/v (gqa)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"  # Qwen3: per head; OLMoE: over the whole projection
    clip_qkv: float | None = None
    sliding_window: int | None = None
    # MLA (DeepSeek-V2)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # --- rotary embeddings
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | yarn
    rope_factor: float = 1.0
    rope_yarn: tuple[tuple[str, float], ...] = ()  # extra yarn fields, as sorted (name, value) pairs
    rope_interleaved: bool = False  # DeepSeek pairs (2i, 2i+1); others rotate halves
    partial_rotary_factor: float = 1.0  # GQA: the first head_dim * this dims rotate, the rest pass (GLM-4.5: 0.5)
    max_position_embeddings: int = 4096

    # --- MLP / MoE
    intermediate_size: int = 0  # dense MLP width (dense layers)
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP (False)
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # K
    moe_intermediate_size: int = 0  # f
    norm_topk_prob: bool = False  # renormalise the Top-K softmax weights to sum to one
    routed_scaling_factor: float = 1.0
    # greedy: Top-K of the scores; group_limited_greedy (DeepSeek-V2): within the topk_group groups of highest max
    # score; noaux_tc (DeepSeek-V3, GLM-4.5): scores + e_score_correction_bias choose, groups ranked by their top-2
    scoring_func: Literal["softmax", "sigmoid"] = "softmax"  # router logits -> scores (DeepSeek-V3, GLM: sigmoid)
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] = "greedy"
    n_group: int = 1
    topk_group: int = 1
    router_float32: bool = False  # DeepSeek computes router logits in float32
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared expert
    mlp_bias: bool = False

    # --- special tokens (for generation)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        def need(cond, field, msg):
            if not cond:
                raise ConfigError(f"{self.architecture}: field '{field}' {msg}")

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        need(len(self.moe_layers) == self.num_hidden_layers, "moe_layers",
             f"has {len(self.moe_layers)} entries for {self.num_hidden_layers} layers")
        if any(self.moe_layers):
            need(self.num_experts > 0, "num_experts", "must be positive in a model with MoE layers")
            need(1 <= self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"must be in [1, {self.num_experts}], got {self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        need(self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"), "topk_method",
             f"'{self.topk_method}' is not supported (greedy, group_limited_greedy, noaux_tc)")
        need(self.scoring_func in ("softmax", "sigmoid"), "scoring_func",
             f"'{self.scoring_func}' is not supported (softmax, sigmoid)")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            need(self.n_group >= 1 and self.num_experts % self.n_group == 0, "n_group",
                 f"must divide num_experts={self.num_experts}, got {self.n_group}")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            need(self.topk_group * (self.num_experts // self.n_group) >= self.num_experts_per_tok, "topk_group",
                 f"({self.topk_group} groups of {self.num_experts // self.n_group} experts) leaves fewer experts "
                 f"than num_experts_per_tok={self.num_experts_per_tok}")
        if self.topk_method == "noaux_tc":
            need(self.num_experts // self.n_group >= 2, "n_group",
                 f"noaux_tc ranks groups by their top-2 scores: groups need >= 2 experts, got "
                 f"{self.num_experts // self.n_group}")
        if self.attention == "gqa":
            need(self.head_dim > 0, "head_dim", "must be positive")
            need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})")
            rot = self.head_dim * self.partial_rotary_factor
            need(0 < self.partial_rotary_factor <= 1 and rot == int(rot) and int(rot) % 2 == 0,
                 "rope_parameters.partial_rotary_factor",
                 f"must give an even number of rotary dims out of head_dim={self.head_dim}, got "
                 f"{self.partial_rotary_factor}")
        else:
            for f in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, f) > 0, f, "must be positive for MLA attention")
            need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even")
        need(self.rope_type in ("default", "linear", "yarn"), "rope_parameters.rope_type",
             f"'{self.rope_type}' is not supported (default, linear, yarn)")

    # ---- derived
    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """Softmax scale: 1/sqrt(qk head dim), times yarn's mscale squared for MLA as DeepSeek does."""
        scale = self.qk_head_dim ** -0.5
        yarn = dict(self.rope_yarn)
        if self.attention == "mla" and self.rope_type != "default" and yarn.get("mscale_all_dim"):
            m = _yarn_mscale(self.rope_factor, yarn["mscale_all_dim"])
            scale = scale * m * m
        return scale

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim // 2] float32 and the cos/sin scaling, as transformers computes them."""
    dim = cfg.rotary_dim
    base = cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type == "default":
        return inv_freq, 1.0
    if cfg.rope_type == "linear":
        return (inv_freq / cfg.rope_factor).astype(np.float32), 1.0
    # yarn (transformers' _compute_yarn_parameters)
    y = dict(cfg.rope_yarn)
    factor = cfg.rope_factor
    attention_factor = y.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = y.get("mscale"), y.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = y.get("beta_fast") or 32
    beta_slow = y.get("beta_slow") or 1
    orig = y["original_max_position_embeddings"]

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if y.get("truncate", 1.0):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    inv_interp = 1.0 / (factor * pos_freqs)
    inv = inv_interp * (1 - extrap) + inv_freq * extrap
    return inv.astype(np.float32), float(attention_factor)


def config_from_arch(arch, *, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> ModelConfig:
    """A Qwen3-MoE-layout ModelConfig from a `model.arch` mapping (configs/tiny_pretrain.py: architecture,
    vocab_size, hidden_size, num_hidden_layers, heads, head_dim, experts, ...; every layer MoE, per-head q/k norm),
    with the tokenizer's special token ids."""
    a = dict(arch)
    n = a.pop("num_hidden_layers")
    return ModelConfig(
        architecture=a.pop("architecture"), vocab_size=a.pop("vocab_size"), hidden_size=a.pop("hidden_size"),
        num_hidden_layers=n, rms_norm_eps=a.pop("rms_norm_eps"), tie_word_embeddings=a.pop("tie_word_embeddings"),
        num_attention_heads=a.pop("num_attention_heads"), num_key_value_heads=a.pop("num_key_value_heads"),
        head_dim=a.pop("head_dim"), qk_norm="head", rope_theta=a.pop("rope_theta"),
        max_position_embeddings=a.pop("max_position_embeddings"), moe_layers=(True,) * n,
        num_experts=a.pop("num_experts"), num_experts_per_tok=a.pop("num_experts_per_tok"),
        moe_intermediate_size=a.pop("moe_intermediate_size"), intermediate_size=0,
        norm_topk_prob=a.pop("norm_topk_prob"), bos_token_id=bos_token_id, eos_token_id=(eos_token_id,),
        pad_token_id=pad_token_id, **a)
