"""The decoder-only MoE language model shared by every family.

`MoECausalLM(cfg)` builds embeddings, `num_hidden_layers` decoder layers (attention + MoE block or dense
MLP, per `cfg.moe_layers`), the final norm and the LM head. Calling it returns `CausalLMOutput` with the
logits and, per MoE layer, the router logits and the selected expert ids and weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention, AttentionContext, MLAttention, matmul, project
from .config import ModelConfig
from .layers import INIT_STD, MLP, RMSNorm, linear, rope_cos_sin
from .moe import MoEBlock, MoEOutput, swiglu
from .routing import TOPK, MaskHook


@dataclasses.dataclass
class CausalLMOutput:
    """logits [B, S, V] float32 ([B, logits_to_keep, V] where the call kept fewer); moe: one MoEOutput per MoE
    layer (in layer order); cache: updated KV cache."""

    logits: jax.Array
    moe: list[MoEOutput]
    cache: dict | None = None

    @property
    def router_logits(self):
        return [m.router_logits for m in self.moe]

    @property
    def topk_ids(self):
        return [m.topk_ids for m in self.moe]

    @property
    def topk_weights(self):
        return [m.topk_weights for m in self.moe]


jax.tree_util.register_dataclass(CausalLMOutput, data_fields=["logits", "moe", "cache"], meta_fields=[])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, param_dtype)
        attn_cls = MLAttention if cfg.attention == "mla" else Attention
        self.self_attn = attn_cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, param_dtype)
        self.is_moe = cfg.moe_layers[layer_idx]
        if self.is_moe:
            self.mlp = MoEBlock(cfg, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, ctx, cache=None, mask_hook: MaskHook = TOPK, impl="reference"):
        h, cache = self.self_attn(self.input_layernorm(x), ctx, cache)
        x = x + h
        rec = None
        if self.is_moe:
            h, rec = self.mlp(self.post_attention_layernorm(x), mask_hook, impl)
        else:
            h = swiglu(self.mlp, self.post_attention_layernorm(x))
        return x + h, cache, rec


def _call_layer(layer, x, ctx, cache, mask_hook, impl):
    return layer(x, ctx, cache, mask_hook, impl)


def _remat_layer(layer, x, ctx, cache, mask_hook, impl):
    """The layer under `jax.checkpoint`: its activations are recomputed in the backward pass."""
    graphdef, state = nnx.split(layer)

    def f(state, x, ctx, cache):
        return nnx.merge(graphdef, state)(x, ctx, cache, mask_hook, impl)

    return jax.checkpoint(f)(state, x, ctx, cache)


class MoECausalLM(nnx.Module):
    """input_ids [B, S] int32 -> CausalLMOutput. Parameters in `dtype` (float32 or bfloat16)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = param_dtype or dtype
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.remat = False  # rematerialise each decoder layer in the backward pass (set by the trainer)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(INIT_STD), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype,
                                                                   param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
        """A zeroed KV cache for `max_len` slots: {"layers": [{"k", "v"}...], "index": 0, "valid": [B, L]}."""
        cfg, dtype = self.cfg, dtype or self.dtype
        if cfg.attention == "mla":
            hk, dk, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
        else:
            hk, dk, dv = cfg.num_key_value_heads, cfg.head_dim, cfg.head_dim
        layers = [{"k": jnp.zeros((batch_size, max_len, hk, dk), dtype),
                   "v": jnp.zeros((batch_size, max_len, hk, dv), dtype)} for _ in range(cfg.num_hidden_layers)]
        return {"layers": layers, "index": jnp.zeros((), jnp.int32),
                "valid": jnp.zeros((batch_size, max_len), bool)}

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
                 mask_hook: MaskHook = TOPK, impl: str = "reference", logits_to_keep: int = 0,
                 fresh_cache: bool = False, float32_logits: bool = True) -> CausalLMOutput:
        """input_ids [B, S] int; attention_mask [B, S] (1 = real token, 0 = padding), default all ones;
        positions [B, S], default counted from the mask (left padding) and the cache index;
        cache from `init_cache` (decoding) or None (a full forward); impl: expert path (see experts.py);
        logits_to_keep: as transformers' argument, the LM head only on the last that many positions (logits
        [B, logits_to_keep, V]; 0: every position). `generate`'s prefill keeps 1: with S prompt tokens the head
        would otherwise multiply S rows for the one it samples from. fresh_cache (static): the cache holds no token
        yet (`init_cache`'s, as `generate`'s prefill fills it): attention reads this call's S keys, not the cache's
        L slots, and skips the causal mask's upper blocks (`attention.attend`); the same result.
        float32_logits=False (static) leaves the logits in the LM head's dtype (`generate`'s greedy steps: the argmax
        of bfloat16 logits is that of their float32 copy, without converting [B, V] every step)."""
        B, S = input_ids.shape
        mask = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        if cache is None:
            kv_valid = mask
        else:
            kv_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], mask, index, axis=1)
        if positions is None:
            # position = number of real tokens before this one (HF: cumsum(mask) - 1 with left padding)
            seen = jnp.cumsum(kv_valid.astype(jnp.int32), axis=1) - 1
            positions = jax.lax.dynamic_slice_in_dim(seen, index, S, axis=1)
            positions = jnp.maximum(positions, 0)
        cos, sin = rope_cos_sin(self.cfg, positions)
        ctx = AttentionContext(cos, sin, kv_valid, index + jnp.arange(S, dtype=jnp.int32), index,
                               fresh=bool(fresh_cache) and cache is not None)

        x = self.embed_tokens(input_ids)
        recs, new_layers = [], []
        call = _remat_layer if self.remat else _call_layer
        for i, layer in enumerate(self.layers):
            x, layer_cache, rec = call(layer, x, ctx, None if cache is None else cache["layers"][i], mask_hook, impl)
            new_layers.append(layer_cache)
            if rec is not None:
                recs.append(rec)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if self.lm_head is None:
            emb = self.embed_tokens
            logits = matmul(x.astype(emb.dtype), emb.embedding[...].astype(emb.dtype), transpose_w=True)
        else:
            logits = project(self.lm_head, x)
        new_cache = None
        if cache is not None:
            new_cache = {"layers": new_layers, "index": index + S, "valid": kv_valid}
        return CausalLMOutput(logits.astype(jnp.float32) if float32_logits else logits, recs, new_cache)
