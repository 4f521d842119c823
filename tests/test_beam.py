"""Tests for beam_jax.beam: the mask, the straight-through estimator, the losses and the beta controller."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_jax import beam

F32 = dict(rtol=1e-5, atol=1e-6)


def _rand(rng, shape, scale=1.0, dtype=np.float32):
    x = (scale * rng.standard_normal(shape)).astype(dtype)
    assert np.any(x != 0), "random input came out all zeros"
    return x


def _topk_ids(logits, k):
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k].astype(np.int32)


# ----------------------------------------------------------------------------- mask_probs / hard_mask


def test_mask_probs_gathers_then_sigmoid():
    logits = jnp.array([[0.0, 2.0, -1.0, np.log(3.0)], [5.0, -5.0, 1.0, 0.0]], jnp.float32)
    ids = jnp.array([[1, 3], [2, 0]], jnp.int32)
    m_hat = beam.mask_probs(logits, ids)
    expected = 1 / (1 + np.exp(-np.array([[2.0, np.log(3.0)], [1.0, 5.0]])))
    assert m_hat.dtype == jnp.float32 and m_hat.shape == (2, 2)
    np.testing.assert_allclose(m_hat, expected, **F32)
    np.testing.assert_allclose(m_hat[0, 1], 0.75, **F32)


def test_mask_probs_bf16_input_gives_float32_and_gradient_only_at_candidates():
    logits = jnp.zeros((3, 5), jnp.bfloat16)
    ids = jnp.array([[0, 4], [2, 2], [1, 3]], jnp.int32)
    assert beam.mask_probs(logits, ids).dtype == jnp.float32
    grad = jax.grad(lambda z: jnp.sum(beam.mask_probs(z, ids)))(logits.astype(jnp.float32))
    touched = np.zeros((3, 5))
    for t in range(3):
        for e in np.asarray(ids[t]):
            touched[t, e] += 0.25  # sigmoid'(0) = 1/4, counted per gather
    np.testing.assert_allclose(grad, touched, **F32)


def test_hard_mask_threshold_is_inclusive():
    m_hat = jnp.array([[0.5, np.nextafter(np.float32(0.5), np.float32(0)), 0.9, 0.1]], jnp.float32)
    np.testing.assert_array_equal(beam.hard_mask(m_hat), [[True, False, True, False]])
    np.testing.assert_array_equal(beam.hard_mask(m_hat, 0.95), [[False, False, False, False]])
    assert beam.hard_mask(m_hat).dtype == jnp.bool_


# ----------------------------------------------------------------------------- STE


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("tau", [0.5, 0.3, 0.7, 0.9])
def test_ste_forward_is_exactly_the_hard_mask(dtype, tau):
    rng = np.random.default_rng(0)
    m_hat = jnp.asarray(rng.uniform(0, 1, (257, 8)), dtype)
    for fn in (beam.ste_mask, jax.jit(beam.ste_mask)):
        m = fn(m_hat, tau)
        assert m.dtype == dtype
        np.testing.assert_array_equal(np.asarray(m, np.float32), np.asarray(m_hat >= tau, np.float32))
        assert set(np.unique(np.asarray(m, np.float32))) <= {0.0, 1.0}


def test_ste_gradient_is_identity_and_none_for_tau():
    rng = np.random.default_rng(1)
    m_hat = jnp.asarray(rng.uniform(0, 1, (6, 4)), jnp.float32)
    c = jnp.asarray(_rand(rng, (6, 4)))
    g_m, g_tau = jax.grad(lambda m, t: jnp.sum(beam.ste_mask(m, t) * c), argnums=(0, 1))(m_hat, jnp.float32(0.6))
    np.testing.assert_array_equal(g_m, c)
    assert g_tau == 0
    # forward-mode agrees
    _, tangent = jax.jvp(lambda m: beam.ste_mask(m, 0.5), (m_hat,), (c,))
    np.testing.assert_array_equal(tangent, c)


def test_ste_gradient_matches_hand_derived_formula_for_mask_router():
    """Loss through the whole BEAM combine, differentiated w.r.t. W_m, against the analytic expression.

    y_t = sum_k m_tk g_tk o_tk,  m = ste(sigmoid(z)), z_tk = W_m[e_tk] . x_t,  L = 1/2 sum_t |y_t - r_t|^2
    => dL/dW_m[e] = sum_{t,k: e_tk = e} g_tk <o_tk, y_t - r_t> sigmoid(z_tk) (1 - sigmoid(z_tk)) x_t
    with y computed from the HARD mask (the STE forward).
    """
    rng = np.random.default_rng(2)
    T, d, E, K, D = 5, 3, 6, 3, 4
    x = _rand(rng, (T, d))
    w_m = _rand(rng, (E, d))
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    g = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    o = _rand(rng, (T, K, D))
    r = _rand(rng, (T, D))

    def loss_from_logits(mask_logits):
        m = beam.ste_mask(beam.mask_probs(mask_logits, ids), 0.5)
        y = jnp.einsum("tk,tkd->td", beam.apply_mask(g, m), o)
        return 0.5 * jnp.sum((y - r) ** 2)

    def loss(w):
        return loss_from_logits(x @ w.T)

    grad = jax.grad(loss)(jnp.asarray(w_m))

    z = np.einsum("td,tkd->tk", x, w_m[ids])
    s = 1 / (1 + np.exp(-z))
    hard = (s >= 0.5).astype(np.float32)
    assert 0 < hard.sum() < hard.size, "the case should keep some candidates and drop some"
    y = np.einsum("tk,tkd->td", hard * g, o)
    expected = np.zeros((E, d), np.float64)
    for t in range(T):
        for k in range(K):
            expected[ids[t, k]] += g[t, k] * (o[t, k] @ (y[t] - r[t])) * s[t, k] * (1 - s[t, k]) * x[t]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
    # dropped candidates still get gradient: d L / d z is nonzero at every (token, candidate), kept or not
    dz = jax.grad(lambda zl: loss_from_logits(zl))(jnp.asarray(x @ w_m.T))
    dz_pairs = np.take_along_axis(np.asarray(dz), ids, -1)
    assert np.all(dz_pairs[hard == 0] != 0) and np.all(dz_pairs[hard == 1] != 0)


# ----------------------------------------------------------------------------- apply_mask


def test_step_zero_is_topk_bit_for_bit():
    """Zero-initialised W_m: m_hat = 0.5 everywhere, all kept at tau = 0.5, weights unchanged bit for bit."""
    rng = np.random.default_rng(3)
    T, d, E, K = 16, 8, 8, 2
    x = _rand(rng, (T, d))
    logits = _rand(rng, (T, E))
    ids = _topk_ids(logits, K)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    weights = np.take_along_axis(p, ids, -1)
    weights = weights / weights.sum(-1, keepdims=True)
    w_m = jnp.zeros((E, d), jnp.float32)
    m_hat = beam.mask_probs(x @ w_m.T, ids)
    np.testing.assert_array_equal(m_hat, np.full((T, K), 0.5, np.float32))
    keep = beam.hard_mask(m_hat, 0.5)
    assert bool(jnp.all(keep))
    for wdt in (jnp.float32, jnp.bfloat16):
        w = jnp.asarray(weights, wdt)
        for m in (keep, beam.ste_mask(m_hat, 0.5)):
            out = beam.apply_mask(w, m)
            assert out.dtype == (wdt if m.dtype == jnp.bool_ else jnp.promote_types(wdt, m.dtype))
            np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(w, np.float32))


def test_apply_mask_hand_values():
    g = jnp.array([[0.5, 0.3, 0.2], [0.4, 0.2, 0.1], [0.6, 0.3, 0.1]], jnp.float32)
    m = jnp.array([[1, 0, 1], [0, 1, 1], [0, 0, 0]], bool)
    np.testing.assert_allclose(beam.apply_mask(g, m), [[0.5, 0, 0.2], [0, 0.2, 0.1], [0, 0, 0]], **F32)
    renorm = beam.apply_mask(g, m, renormalize=True)
    # kept weights rescaled to the row's original total: 1.0, 0.7, and zeros for the all-dropped row
    np.testing.assert_allclose(
        renorm, [[0.5 / 0.7, 0, 0.2 / 0.7], [0, 0.2 * 0.7 / 0.3, 0.1 * 0.7 / 0.3], [0, 0, 0]], **F32
    )
    np.testing.assert_allclose(jnp.sum(renorm, -1), [1.0, 0.7, 0.0], **F32)


def test_apply_mask_renormalize_all_dropped_has_finite_gradient():
    g = jnp.array([[0.6, 0.4], [0.7, 0.3]], jnp.float32)
    m_hat = jnp.array([[0.1, 0.2], [0.9, 0.2]], jnp.float32)

    def f(g, m_hat):
        return jnp.sum(beam.apply_mask(g, beam.ste_mask(m_hat, 0.5), renormalize=True) ** 2)

    grads = jax.grad(f, argnums=(0, 1))(g, m_hat)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in grads)
    np.testing.assert_allclose(beam.apply_mask(g, m_hat >= 0.5, renormalize=True), [[0, 0], [1.0, 0]], **F32)


def test_apply_mask_float_mask_carries_gradient():
    g = jnp.array([[0.5, 0.25]], jnp.float32)
    grad = jax.grad(lambda m: jnp.sum(beam.apply_mask(g, m) * jnp.array([[2.0, 4.0]])))(jnp.ones((1, 2)))
    np.testing.assert_allclose(grad, [[1.0, 1.0]], **F32)


# ----------------------------------------------------------------------------- reg loss, kept fraction


def test_reg_loss_and_kept_fraction_hand_values():
    m_hat = jnp.array([[0.2, 0.4], [0.6, 1.0], [0.9, 0.9]], jnp.float32)
    np.testing.assert_allclose(beam.reg_loss(m_hat), 4.0 / 6, **F32)
    valid = jnp.array([True, True, False])
    np.testing.assert_allclose(beam.reg_loss(m_hat, valid), 2.2 / 4, **F32)
    np.testing.assert_allclose(beam.reg_loss(m_hat, valid.astype(jnp.float32)), 2.2 / 4, **F32)
    keep = m_hat >= 0.5
    np.testing.assert_allclose(beam.kept_fraction(keep), 4 / 6, **F32)
    np.testing.assert_allclose(beam.kept_fraction(keep, valid), 2 / 4, **F32)
    assert beam.kept_fraction(keep, jnp.zeros(3, bool)) == 0
    # gradient of L_reg is 1 / (valid tokens * K) on valid entries, 0 on padding
    grad = jax.grad(beam.reg_loss)(m_hat, valid)
    np.testing.assert_allclose(grad, [[0.25, 0.25], [0.25, 0.25], [0, 0]], **F32)


# ----------------------------------------------------------------------------- load balancing vs transformers


def _hf_loss(logits_list, E, K, attention_mask=None):
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gate = tuple(torch.from_numpy(np.asarray(x)) for x in logits_list)
    mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask))
    return float(load_balancing_loss_func(gate, E, K, mask))


@pytest.mark.parametrize("E,K", [(8, 2), (16, 4), (60, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_matches_transformers(E, K, masked):
    rng = np.random.default_rng(E * 10 + K + masked)
    B, S, L = 3, 7, 3
    logits = [_rand(rng, (B * S, E), 2.0) for _ in range(L)]
    mask = (rng.uniform(size=(B, S)) > 0.3).astype(np.int64) if masked else None
    valid = None if mask is None else jnp.asarray(mask.reshape(-1).astype(bool))
    # one layer; expert_ids given, and None (top-k taken from the logits as transformers does)
    ids0 = jnp.asarray(_topk_ids(logits[0], K))
    want = _hf_loss(logits[:1], E, K, mask)
    np.testing.assert_allclose(beam.load_balancing_loss(jnp.asarray(logits[0]), ids0, E, K, valid), want, rtol=1e-5)
    np.testing.assert_allclose(beam.load_balancing_loss(jnp.asarray(logits[0]), None, E, K, valid), want, rtol=1e-5)
    # all layers: transformers concatenates them
    want_all = _hf_loss(logits, E, K, mask)
    stacked = jnp.asarray(np.stack(logits))
    ids = jnp.asarray(np.stack([_topk_ids(x, K) for x in logits]))
    got = jax.jit(beam.load_balancing_loss_layers, static_argnums=(2, 3))(stacked, ids, E, K, valid)
    np.testing.assert_allclose(got, want_all, rtol=1e-5)
    np.testing.assert_allclose(
        beam.load_balancing_loss_layers([jnp.asarray(x) for x in logits], None, E, K, valid), want_all, rtol=1e-5
    )
    # [L, B, S, E] with a [B, S] mask, as the model records them, flattens to the same thing
    valid_bs = None if valid is None else valid.reshape(B, S)
    got_bs = beam.load_balancing_loss_layers(stacked.reshape(L, B, S, E), ids.reshape(L, B, S, K), E, K, valid_bs)
    np.testing.assert_allclose(got_bs, want_all, rtol=1e-5)


def test_load_balancing_hand_values():
    # uniform router: every expert gets prob 1/E, the loss is exactly K
    E, K, T = 4, 2, 6
    logits = jnp.zeros((T, E))
    ids = jnp.array([[0, 1], [2, 3]] * 3, jnp.int32)
    np.testing.assert_allclose(beam.load_balancing_loss(logits, ids, E, K), K, **F32)
    # everything on expert 0 and 1 with probs (1, 0, 0, 0): E * (1 * 1 + 1 * 0) = 4
    logits = jnp.tile(jnp.array([[50.0, -50.0, -50.0, -50.0]]), (T, 1))
    ids = jnp.tile(jnp.array([[0, 1]], jnp.int32), (T, 1))
    np.testing.assert_allclose(beam.load_balancing_loss(logits, ids, E, K), 4.0, rtol=1e-5)
    with pytest.raises(ValueError):
        beam.load_balancing_loss(logits, ids, E, 3)


def test_load_balancing_per_layer_is_the_mean_of_each_layers_loss():
    rng = np.random.default_rng(7)
    L, T, E, K = 3, 11, 8, 2
    logits = jnp.asarray(np.stack([_rand(rng, (T, E), 2.0) for _ in range(L)]))
    ids = jax.lax.top_k(logits, K)[1]
    valid = jnp.asarray(rng.random(T) > 0.3)
    want = np.mean([_hf_loss([np.asarray(logits[i])], E, K, np.asarray(valid, np.int64)[None]) for i in range(L)])
    got = jax.jit(beam.load_balancing_loss_per_layer, static_argnums=(2, 3))(logits, ids, E, K, valid)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(beam.load_balancing_loss_per_layer(list(logits), None, E, K, valid), want, rtol=1e-5)


def test_per_layer_balance_sees_what_pooling_hides():
    # layer 0 sends everything to experts {0, 1}, layer 1 to {2, 3}: pooled over layers the load is uniform,
    # per layer it is not. The per-layer loss is larger, and the least-loaded expert of each layer has 0 load.
    E, K, T = 4, 2, 6
    l0 = jnp.tile(jnp.array([[5.0, 5.0, -5.0, -5.0]]), (T, 1))
    l1 = jnp.tile(jnp.array([[-5.0, -5.0, 5.0, 5.0]]), (T, 1))
    logits = jnp.stack([l0, l1])
    ids = jax.lax.top_k(logits, K)[1]
    pooled = float(beam.load_balancing_loss_layers(logits, ids, E, K))
    per_layer = float(beam.load_balancing_loss_per_layer(logits, ids, E, K))
    np.testing.assert_allclose(pooled, K, rtol=1e-3)  # uniform when pooled
    assert per_layer > 1.9 * pooled  # each layer: E * 2 * (1/2 * ~1/2) = 4
    np.testing.assert_allclose(beam.expert_load_min_over_mean(ids, E), [0.0, 0.0])
    # balanced ids: every expert equally often; padding rows do not count
    ids_bal = jnp.asarray(np.tile([[0, 1], [2, 3]], (3, 1)))[None]
    np.testing.assert_allclose(beam.expert_load_min_over_mean(ids_bal, E), [1.0])
    ids_pad = jnp.concatenate([ids_bal, jnp.zeros((1, 4, 2), jnp.int32)], axis=1)
    valid = jnp.arange(10) < 6
    np.testing.assert_allclose(beam.expert_load_min_over_mean(ids_pad, E, valid), [1.0])
    assert float(beam.expert_load_min_over_mean(ids_pad, E)[0]) < 1.0


def test_load_balancing_all_padding_is_zero_not_nan():
    logits = jnp.ones((4, 8))
    ids = jnp.zeros((4, 2), jnp.int32)
    assert beam.load_balancing_loss(logits, ids, 8, 2, jnp.zeros(4, bool)) == 0


# ----------------------------------------------------------------------------- LM loss and accuracy


def test_lm_loss_matches_numpy_and_ignores_masked_positions():
    rng = np.random.default_rng(4)
    B, S, V = 2, 5, 11
    logits = _rand(rng, (B, S, V), 3.0)
    labels = rng.integers(0, V, (B, S)).astype(np.int32)
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], bool)
    labels[~mask] = -100  # HF-style ignore ids under the mask must not matter
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    nll = -np.take_along_axis(logp, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    loss, n = beam.lm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    assert n == mask.sum()
    np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5)
    # bf16 logits are upcast: loss stays float32 and close
    loss16, _ = beam.lm_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(mask))
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, nll[mask].mean(), rtol=2e-2)


def test_lm_loss_hand_value_and_empty_mask():
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [np.log(3.0), 0.0, 0.0, 0.0]], jnp.float32)
    labels = jnp.array([2, 0], jnp.int32)
    loss, n = beam.lm_loss(logits, labels, jnp.array([True, True]))
    np.testing.assert_allclose(loss, (np.log(4.0) + np.log(2.0)) / 2, **F32)
    assert n == 2
    loss, n = beam.lm_loss(logits, labels, jnp.array([False, False]))
    assert loss == 0 and n == 0
    grad = jax.grad(lambda z: beam.lm_loss(z, labels, jnp.array([False, False]))[0])(logits)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_distill_loss_matches_numpy_kl_and_stops_the_teachers_gradient():
    rng = np.random.default_rng(5)
    B, S, V = 2, 4, 9
    student, teacher = _rand(rng, (B, S, V), 2.0), _rand(rng, (B, S, V), 2.0)
    mask = np.array([[1, 0, 1, 1], [1, 1, 0, 1]], bool)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    t, s = log_softmax(teacher.astype(np.float64)), log_softmax(student.astype(np.float64))
    want = (np.exp(t) * (t - s)).sum(-1)[mask].mean()
    kl, n = beam.distill_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask))
    assert n == mask.sum() and kl.dtype == jnp.float32
    np.testing.assert_allclose(kl, want, rtol=1e-5)
    assert want > 0.1  # random logits disagree
    # equal logits: exactly no divergence; the gradient reaches the student only
    same, _ = beam.distill_loss(jnp.asarray(teacher), jnp.asarray(teacher), jnp.asarray(mask))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    g_student, g_teacher = jax.grad(lambda a, b: beam.distill_loss(a, b, jnp.asarray(mask))[0], argnums=(0, 1))(
        jnp.asarray(student), jnp.asarray(teacher))
    assert float(jnp.abs(g_student).max()) > 0 and float(jnp.abs(g_teacher).max()) == 0
    # d KL / d student logits = (softmax(student) - softmax(teacher)) / n at masked positions, 0 elsewhere
    np.testing.assert_allclose(g_student, (np.exp(s) - np.exp(t)) * mask[..., None] / mask.sum(), atol=1e-6)
    empty, n0 = beam.distill_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.zeros_like(jnp.asarray(mask)))
    assert empty == 0 and n0 == 0


def test_next_token_accuracy_hand_values():
    logits = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7], [1.0, 0.0, 0.0]])
    labels = jnp.array([1, 2, 2, 0])
    acc, n = beam.next_token_accuracy(logits, labels, jnp.array([1, 1, 1, 0]))
    np.testing.assert_allclose(acc, 2 / 3, **F32)
    assert n == 3


# ----------------------------------------------------------------------------- total loss and beta controller


def test_total_loss():
    np.testing.assert_allclose(beam.total_loss(2.0, 3.0, 0.5, 0.01, 0.2), 2.0 + 0.03 + 0.1, **F32)


def test_beta_controller_moves_beta_the_right_way():
    ctl = beam.BetaController(beta_min=1e-3, beta_max=5.0)
    beta = ctl.init(0.1)
    assert beta.dtype == jnp.float32
    up = ctl.update(beta, observed_ratio=0.8, target=0.5, rate=0.5)  # too many experts kept -> more pressure
    down = ctl.update(beta, observed_ratio=0.2, target=0.5, rate=0.5)
    same = ctl.update(beta, observed_ratio=0.5, target=0.5, rate=0.5)
    assert up > beta > down
    np.testing.assert_allclose(same, beta, **F32)
    np.testing.assert_allclose(up, 0.1 * np.exp(0.5 * 0.6), rtol=1e-6)
    # clipped at both ends; a beta below the floor starts from the floor
    assert ctl.update(jnp.float32(4.9), 1.0, 0.1, 10.0) == 5.0
    assert ctl.update(jnp.float32(2e-3), 0.0, 0.9, 10.0) == np.float32(1e-3)
    assert ctl.init(0.0) == np.float32(1e-3)
    with pytest.raises(ValueError):
        beam.BetaController(beta_min=0.0)


def test_beta_controller_closes_the_loop_under_jit():
    """Toy plant: the kept fraction falls as beta rises; the controller settles at the target."""
    ctl = beam.BetaController(beta_min=1e-4, beta_max=100.0)

    def plant(beta):
        return 1.0 / (1.0 + beta)  # kept fraction

    @jax.jit
    def run(beta0, target):
        def step(b, _):
            return ctl.update(b, plant(b), target, 0.3), None

        return jax.lax.scan(step, ctl.init(beta0), None, length=300)[0]

    for target in (0.25, 0.6):
        for beta0 in (0.01, 20.0):
            np.testing.assert_allclose(plant(run(beta0, target)), target, rtol=1e-3)


@settings(max_examples=50, deadline=None)
@given(
    beta=st.floats(1e-3, 5.0),
    observed=st.floats(0.0, 1.0),
    target=st.floats(0.05, 1.0),
)
def test_beta_controller_direction_property(beta, observed, target):
    ctl = beam.BetaController(beta_min=1e-3, beta_max=5.0)
    new = float(ctl.update(ctl.init(beta), observed, target, 0.2))
    b = float(ctl.init(beta))
    if observed > target:
        assert new >= b
    elif observed < target:
        assert new <= b
    assert 1e-3 * (1 - 1e-6) <= new <= 5.0 * (1 + 1e-6)
