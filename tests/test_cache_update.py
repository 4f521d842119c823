"""beam_jax.cache_update (the CPU target writing a KV cache in place) against `lax.dynamic_update_slice_in_dim`, its
reference, on random caches and updates: the float dtypes, one or several new slots, MLA- and GQA-shaped slots, start
indices inside, at the ends and past them (clamped as XLA clamps); inside a jitted decode loop with the cache
donated, where the write must stay in place (no float32 copy of a bfloat16 cache, which XLA's own write makes on
CPU); when `attention._update_cache` uses it; and its errors."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from beam_jax import attention, cache_update as cu  # noqa: E402

pytestmark = pytest.mark.skipif(not cu.cache_update_available(), reason="beam_jax._ffi has no cache update target")


def _random(rs, shape, dtype):
    return jnp.asarray(rs.standard_normal(shape).astype(np.float32) + 0.5, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("B,L,S,rest", [(3, 16, 1, (4, 8)), (2, 33, 5, (2, 24)), (1, 8, 8, (3,)),
                                        (4, 12, 3, (1, 1, 5))])
@pytest.mark.parametrize("index", [0, 5, -3, 40, "last"])
def test_cache_update_equals_dynamic_update_slice(dtype, B, L, S, rest, index):
    rs = np.random.RandomState(B * 100 + L + S)
    cache, update = _random(rs, (B, L, *rest), dtype), _random(rs, (B, S, *rest), dtype)
    index = L - S if index == "last" else index
    want = cu.reference_cache_update(cache, update, index)
    got = jax.jit(cu.cache_update)(cache, update, jnp.int32(index))
    assert got.dtype == cache.dtype and got.shape == cache.shape
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    start = min(max(index + L if index < 0 else index, 0), L - S)  # lax: a negative start counts from L
    np.testing.assert_array_equal(np.asarray(got[:, start:start + S].astype(jnp.float32)),
                                  np.asarray(update.astype(jnp.float32)))


def _loop(write, steps):
    def body(i, carry):
        cache, u = carry
        return write(cache, (u * (i + 1)).astype(cache.dtype), i), u

    return jax.jit(lambda cache, u: jax.lax.fori_loop(0, steps, body, (cache, u))[0], donate_argnums=0)


def test_cache_update_in_a_donated_decode_loop_stays_in_place():
    B, L, Hkv, D, steps = 8, 64, 4, 16, 40
    rs = np.random.RandomState(0)
    u = _random(rs, (B, 1, Hkv, D), jnp.float32)
    start = _random(rs, (B, L, Hkv, D), jnp.bfloat16)
    want = _loop(cu.reference_cache_update, steps)(start.copy(), u)
    fast = _loop(cu.cache_update, steps)
    got = fast(start.copy(), u)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    # slots past the loop's last write keep the starting cache
    np.testing.assert_array_equal(np.asarray(got[:, steps:].astype(jnp.float32)),
                                  np.asarray(start[:, steps:].astype(jnp.float32)))
    # XLA's own write of a bfloat16 cache converts the whole cache to float32 and back every step (why the target
    # exists); through the target the compiled loop holds no float32 cache
    f32_cache = f"f32[{B},{L},{Hkv},{D}]"
    assert f32_cache in _loop(cu.reference_cache_update, steps).lower(start, u).compile().as_text()
    assert f32_cache not in fast.lower(start, u).compile().as_text()


def test_update_cache_uses_the_target_for_low_precision_caches_on_cpu(monkeypatch):
    calls = []
    real = attention.cache_update
    monkeypatch.setattr(attention, "cache_update", lambda *a: calls.append(1) or real(*a))
    rs = np.random.RandomState(1)
    ctx = attention.AttentionContext(cos=None, sin=None, kv_valid=jnp.ones((2, 8), bool), q_slot=jnp.arange(2),
                                     index=jnp.int32(3))
    for dtype, used in (("bfloat16", True), ("float16", True), ("float32", False)):
        calls.clear()
        cache = {"k": _random(rs, (2, 8, 2, 4), dtype), "v": _random(rs, (2, 8, 2, 4), dtype)}
        k, v = _random(rs, (2, 2, 2, 4), jnp.float32), _random(rs, (2, 2, 2, 4), jnp.float32)
        (kr, vr), new = attention._update_cache(cache, k, v, ctx)
        assert bool(calls) == used == cu.use_cache_update(dtype)
        for name, x in (("k", k), ("v", v)):
            want = jax.lax.dynamic_update_slice_in_dim(cache[name], x.astype(dtype), 3, axis=1)
            np.testing.assert_array_equal(np.asarray(new[name].astype(jnp.float32)),
                                          np.asarray(want.astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(kr.astype(jnp.float32)), np.asarray(new["k"].astype(jnp.float32)))
    monkeypatch.setenv("BEAM_JAX_CACHE_UPDATE", "0")
    assert not cu.use_cache_update(jnp.bfloat16)


def test_cache_update_errors():
    cache = jnp.zeros((2, 8, 4), jnp.bfloat16)
    with pytest.raises(ValueError, match="update must be"):
        cu.cache_update(cache, jnp.zeros((2, 9, 4), jnp.bfloat16), 0)
    with pytest.raises(ValueError, match="update must be"):
        cu.cache_update(cache, jnp.zeros((3, 1, 4), jnp.bfloat16), 0)
    with pytest.raises(ValueError, match="update must be"):
        cu.cache_update(cache, jnp.zeros((2, 1, 5), jnp.bfloat16), 0)
    with pytest.raises(TypeError, match="cache's dtype"):
        cu.cache_update(cache, jnp.zeros((2, 1, 4), jnp.float32), 0)
    with pytest.raises(ValueError, match="scalar"):
        cu.cache_update(cache, jnp.zeros((2, 1, 4), jnp.bfloat16), jnp.zeros((2,), jnp.int32))
