"""Autoregressive generation with a preallocated KV cache: one jitted prefill, one jitted decode step.

Matches `transformers`' `generate` conventions: left padding through `attention_mask`, sequences that hit
an end-of-sequence token continue with the pad token, greedy by default, sampling with temperature,
top-k and top-p.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .moe import topk_hook


@partial(nnx.jit, static_argnames=("mask_hook", "impl"))
def _forward(model, input_ids, attention_mask, cache, mask_hook, impl):
    out = model(input_ids, attention_mask=attention_mask, cache=cache, mask_hook=mask_hook, impl=impl)
    return out.logits[:, -1], out.cache


def sample_next(logits, rng, *, do_sample=False, temperature=1.0, top_k=0, top_p=1.0):
    """logits [B, V] float32 -> next token ids [B] int32 (argmax, or a sample after the filters)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # smallest set whose probability reaches top_p: drop tokens whose preceding mass already exceeds it
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_token_id=None, pad_token_id=None, mask_hook=topk_hook, impl: str = "kernel"):
    """input_ids [B, S] int (left-padded when `attention_mask` [B, S] has zeros) -> [B, S + new] int32.

    Stops early when every sequence has produced an end-of-sequence token (default: the model config's).
    impl="kernel" runs the experts through `beam_jax.masked_moe` (dropped pairs are skipped).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    B, S = input_ids.shape
    mask = jnp.ones((B, S), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    cfg = model.cfg
    eos = cfg.eos_token_id if eos_token_id is None else (
        tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,))
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                          else (eos[0] if eos else 0))
    cache = model.init_cache(B, S + max_new_tokens)
    rng = jax.random.PRNGKey(seed)
    logits, cache = _forward(model, input_ids, mask, cache, mask_hook, impl)
    tokens = []
    done = np.zeros(B, bool)
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        nxt = np.asarray(sample_next(logits, sub, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                     top_p=top_p))
        nxt = np.where(done, pad, nxt)
        tokens.append(nxt)
        done |= np.isin(nxt, eos)
        if done.all() or len(tokens) == max_new_tokens:
            break
        logits, cache = _forward(model, jnp.asarray(nxt[:, None], jnp.int32), jnp.ones((B, 1), jnp.int32),
                                 cache, mask_hook, impl)
    return jnp.concatenate([input_ids, jnp.asarray(np.stack(tokens, 1), jnp.int32)], axis=1)
