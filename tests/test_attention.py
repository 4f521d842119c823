"""beam_jax.attention: a fresh prefill's attention (`AttentionContext.fresh`: this call's own keys, causal blocks of
`CAUSAL_BLOCK` queries) against attention over the whole cache it was written into (`attend` with every slot), on
random inputs with left padding, several blocks and a partial one, a sliding window, float32 and bfloat16. (The
model's `fresh_cache` prefill: tests/test_model_parity.py; `generate`'s: tests/test_generate.py.)"""

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from beam_jax import attention  # noqa: E402
from beam_jax.attention import AttentionContext, attend  # noqa: E402

TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("S,window", [(300, None), (2 * attention.CAUSAL_BLOCK, None), (200, 50), (90, None)])
def test_fresh_prefill_equals_attention_over_the_whole_cache(dtype, S, window):
    rs = np.random.RandomState(S + (window or 0))
    B, L, H, Hkv, D = 2, 512, 8, 2, 32
    pad = np.array([0, 37])  # row 1 left-padded
    mask = np.arange(S)[None, :] >= pad[:, None]
    q = jnp.asarray(rs.normal(0, 1, (B, S, H, D)), dtype)
    k_new = jnp.asarray(rs.normal(0, 1, (B, S, Hkv, D)), dtype)
    v_new = jnp.asarray(rs.normal(0, 1, (B, S, Hkv, D)), dtype)
    # the cache after the prefill wrote it: this call's keys in slots 0 .. S-1, the zeros of init_cache after them
    k_cache = jnp.zeros((B, L, Hkv, D), dtype).at[:, :S].set(k_new)
    v_cache = jnp.zeros((B, L, Hkv, D), dtype).at[:, :S].set(v_new)
    kv_valid = jnp.zeros((B, L), bool).at[:, :S].set(jnp.asarray(mask))
    q_slot = jnp.arange(S, dtype=jnp.int32)
    whole = AttentionContext(None, None, kv_valid, q_slot, jnp.int32(0))
    fresh = AttentionContext(None, None, kv_valid, q_slot, jnp.int32(0), fresh=True)
    want = attend(q, k_cache, v_cache, whole, 0.2, window)
    got = jax.jit(lambda q, k, v: attend(q, k, v, fresh, 0.2, window))(q, k_new, v_new)
    assert got.shape == want.shape == (B, S, H, D) and got.dtype == want.dtype
    real = np.asarray(mask)  # padding queries attend to nothing: their rows are not compared
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real], **TOL[dtype])


def test_update_cache_returns_the_call_keys_when_fresh():
    B, S, L, Hkv, D = 1, 5, 9, 2, 4
    k = jnp.arange(B * S * Hkv * D, dtype=jnp.float32).reshape(B, S, Hkv, D)
    cache = {"k": jnp.zeros((B, L, Hkv, D), jnp.bfloat16), "v": jnp.zeros((B, L, Hkv, D), jnp.bfloat16)}
    ctx = AttentionContext(None, None, jnp.ones((B, L), bool), jnp.arange(S, dtype=jnp.int32), jnp.int32(0))
    (kr, _), new = attention._update_cache(cache, k, k, ctx)
    (kf, _), new_f = attention._update_cache(cache, k, k, dataclasses.replace(ctx, fresh=True))
    assert kr.shape == (B, L, Hkv, D) and kf.shape == (B, S, Hkv, D) and kf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kf, np.float32), np.asarray(kr, np.float32)[:, :S])
    np.testing.assert_array_equal(np.asarray(new_f["k"], np.float32), np.asarray(new["k"], np.float32))
