"""The three expert paths (reference gather, grouped ragged_dot, dense) agree on random routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax.experts import EXPERT_PATHS, combine_weights, experts_reference

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _inputs(T, d, f, E, K, dtype, seed=0, keep_frac=0.6):
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    x = jax.random.normal(k[0], (T, d), dtype)
    wg = (jax.random.normal(k[1], (E, d, f)) / np.sqrt(d)).astype(dtype)
    wu = (jax.random.normal(k[2], (E, d, f)) / np.sqrt(d)).astype(dtype)
    wd = (jax.random.normal(k[3], (E, f, d)) / np.sqrt(f)).astype(dtype)
    ids = jnp.argsort(jax.random.uniform(k[4], (T, E)), axis=-1)[:, :K].astype(jnp.int32)  # distinct per token
    w = jax.random.uniform(k[5], (T, K), jnp.float32, 0.1, 1.0)
    keep = (jax.random.uniform(k[6], (T, K)) < keep_frac).at[:, 0].set(True)  # never all dropped
    return x, wg, wu, wd, ids, w, keep


def _loop_reference(x, wg, wu, wd, ids, w, keep):
    """The most literal definition, in numpy float64."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            if keep[t, k]:
                e = int(ids[t, k])
                g = x[t] @ wg[e]
                h = g / (1 + np.exp(-g)) * (x[t] @ wu[e])
                y[t] += float(w[t, k]) * (h @ wd[e])
    return y


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T,E,K", [(1, 5, 2), (13, 6, 3), (32, 8, 8), (7, 3, 1)])
def test_paths_agree(dtype, T, E, K):
    args = _inputs(T, 16, 24, E, K, dtype, seed=T * E + K)
    truth = _loop_reference(*[np.asarray(a.astype(jnp.float32)) if a.dtype == jnp.bfloat16 else np.asarray(a)
                              for a in args])
    scale = np.abs(truth).max()
    assert scale > 0
    for name, fn in EXPERT_PATHS.items():
        y = jax.jit(fn)(*args)
        assert y.dtype == dtype and y.shape == (T, 16)
        np.testing.assert_allclose(np.asarray(y, np.float64), truth, atol=TOL[dtype] * max(scale, 1), rtol=0,
                                   err_msg=name)


def test_keep_none_means_all_kept():
    x, wg, wu, wd, ids, w, _ = _inputs(9, 16, 24, 5, 2, jnp.float32)
    for fn in EXPERT_PATHS.values():
        np.testing.assert_allclose(fn(x, wg, wu, wd, ids, w), fn(x, wg, wu, wd, ids, w, jnp.ones(ids.shape, bool)),
                                   atol=1e-6)


def test_all_dropped_gives_zero_and_one_expert_takes_all():
    x, wg, wu, wd, ids, w, _ = _inputs(10, 16, 24, 5, 2, jnp.float32)
    for name, fn in EXPERT_PATHS.items():
        assert np.all(np.asarray(fn(x, wg, wu, wd, ids, w, jnp.zeros(ids.shape, bool))) == 0), name
    same = jnp.full((10, 1), 3, jnp.int32)
    ref = experts_reference(x, wg, wu, wd, same, w[:, :1])
    for name, fn in EXPERT_PATHS.items():
        np.testing.assert_allclose(fn(x, wg, wu, wd, same, w[:, :1]), ref, atol=1e-5, err_msg=name)


def test_gradients_agree():
    """Training differentiates through the expert paths: gradients w.r.t. x and weights agree."""
    x, wg, wu, wd, ids, w, keep = _inputs(11, 16, 24, 6, 3, jnp.float32)
    grads = {}
    for name, fn in EXPERT_PATHS.items():
        def loss(x, w, wg, fn=fn):
            return jnp.sum(fn(x, wg, wu, wd, ids, w, keep) ** 2)
        grads[name] = jax.grad(loss, argnums=(0, 1, 2))(x, w, wg)
    for name in ("grouped", "dense"):
        for a, b in zip(grads[name], grads["reference"]):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_combine_weights():
    ids = jnp.array([[0, 2], [1, 1]], jnp.int32)
    w = jnp.array([[0.5, 0.25], [0.1, 0.2]])
    keep = jnp.array([[True, False], [True, True]])
    np.testing.assert_allclose(combine_weights(ids, w, keep, 3), [[0.5, 0, 0], [0, 0.3, 0]], atol=1e-7)
