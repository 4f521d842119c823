"""Tests for beam_jax.policies: every policy's keep mask on hand-made router outputs, order invariance,
monotonicity in its knob, the calibration of dynamic skipping and the registry."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax import policies as P

# One token, K = 4, deliberately NOT sorted along K. Binary fractions, so sums are exact.
W = jnp.array([[0.0625, 0.5, 0.25, 0.1875]], jnp.float32)  # ranks 3, 0, 1, 2


def _keep(*rows):
    return np.array(rows, bool)


def _random_router(seed, T=64, E=16, K=4):
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal((T, E))).astype(np.float32)
    assert np.any(logits != 0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, -1)[:, :K]
    # shuffle each token's candidates so no policy can lean on a sorted K axis
    perm = np.stack([rng.permutation(K) for _ in range(T)])
    ids = np.take_along_axis(ids, perm, -1).astype(np.int32)
    probs_topk = np.take_along_axis(probs, ids, -1)
    weights = probs_topk / probs_topk.sum(-1, keepdims=True)
    m_hat = rng.uniform(0, 1, (T, K)).astype(np.float32)
    return dict(
        weights=jnp.asarray(weights),
        probs_topk=jnp.asarray(probs_topk),
        router_probs=jnp.asarray(probs),
        m_hat=jnp.asarray(m_hat),
        expert_ids=jnp.asarray(ids),
    )


# ----------------------------------------------------------------------------- ranks


def test_candidate_ranks_unsorted_and_ties():
    np.testing.assert_array_equal(P.candidate_ranks(W), [[3, 0, 1, 2]])
    np.testing.assert_array_equal(P.candidate_ranks(jnp.array([[0.3, 0.3, 0.4]])), [[1, 2, 0]])
    np.testing.assert_array_equal(P.candidate_ranks(jnp.ones((2, 3, 5))), np.broadcast_to(np.arange(5), (2, 3, 5)))


# ----------------------------------------------------------------------------- each policy on hand-made outputs


def test_topk_is_the_routing_hook_not_a_policy():
    """Plain Top-K lives in one place, `routing.TOPK`: every candidate kept, weights unchanged, kept all True."""
    from beam_jax import routing

    assert "topk" not in P.POLICIES and routing.make_hook("topk") is routing.TOPK
    res = routing.TOPK(None, None, None, W, jnp.zeros(W.shape, jnp.int32))
    assert res.keep is None and res.m_hat is None
    np.testing.assert_array_equal(res.kept, _keep([True] * 4))
    np.testing.assert_array_equal(res.weights, W)


def test_beam_keep():
    m_hat = jnp.array([[0.5, 0.49, 0.9, 0.1], [0.2, 0.3, 0.1, 0.0]], jnp.float32)
    np.testing.assert_array_equal(P.beam_keep(m_hat), _keep([1, 0, 1, 0], [0, 0, 0, 0]))
    np.testing.assert_array_equal(P.beam_keep(m_hat, 0.25), _keep([1, 1, 1, 0], [0, 1, 0, 0]))
    np.testing.assert_array_equal(P.beam_keep(m_hat, 0.95), _keep([0, 0, 0, 0], [0, 0, 0, 0]))


@pytest.mark.parametrize(
    "p,expected",
    [
        (0.0, [0, 1, 0, 0]),  # p <= 0: the top-1 only
        (0.5, [0, 1, 0, 0]),  # 0.5 alone reaches 0.5
        (0.6, [0, 1, 1, 0]),  # 0.5 + 0.25 = 0.75 >= 0.6
        (0.75, [0, 1, 1, 0]),  # reaching p exactly stops
        (0.8, [0, 1, 1, 1]),  # 0.5 + 0.25 + 0.1875 = 0.9375 >= 0.8
        (0.95, [1, 1, 1, 1]),  # all four hold 1.0
    ],
)
def test_top_p_keep_hand_values(p, expected):
    np.testing.assert_array_equal(P.top_p_keep(W, p), _keep(expected))


def test_top_p_uses_full_softmax_mass_not_renormalised():
    # The 4 candidates hold only 0.375 of the router's mass: p = 0.5 keeps all of them.
    probs_topk = jnp.array([[0.0625, 0.125, 0.125, 0.0625]], jnp.float32)
    np.testing.assert_array_equal(P.top_p_keep(probs_topk, 0.5), _keep([1, 1, 1, 1]))
    # with p = 0.2: 0.125 (idx 1, first by the tie rule) + 0.125 (idx 2) = 0.25 >= 0.2
    np.testing.assert_array_equal(P.top_p_keep(probs_topk, 0.2), _keep([0, 1, 1, 0]))
    # renormalised (what this policy does NOT do) p = 0.5 would stop after two
    np.testing.assert_array_equal(P.top_p_keep(probs_topk / 0.375, 0.5), _keep([0, 1, 1, 0]))


@pytest.mark.parametrize(
    "beta,expected",
    [
        (0.0, [1, 1, 1, 1]),
        (0.125, [1, 1, 1, 1]),  # threshold 0.0625: equal is kept (drop only when strictly below)
        (0.25, [0, 1, 1, 1]),  # threshold 0.125
        (0.5, [0, 1, 1, 0]),  # threshold 0.25
        (0.75, [0, 1, 0, 0]),  # threshold 0.375
        (1.5, [0, 1, 0, 0]),  # beyond 1: still the top-1
    ],
)
def test_dynamic_skip_keep_hand_values(beta, expected):
    np.testing.assert_array_equal(P.dynamic_skip_keep(W, beta), _keep(expected))


def test_dynamic_skip_per_layer_beta():
    w = jnp.stack([W, W])  # [L=2, T=1, K=4]
    keep = P.dynamic_skip_keep(w, jnp.array([0.25, 0.75]))
    np.testing.assert_array_equal(keep, [_keep([0, 1, 1, 1]), _keep([0, 1, 0, 0])])
    # ratio rule: full-softmax probabilities and renormalised weights give the same mask
    np.testing.assert_array_equal(P.dynamic_skip_keep(W * 0.3, 0.5), P.dynamic_skip_keep(W, 0.5))


@pytest.mark.parametrize(
    "k_prime,expected", [(0, [0, 0, 0, 0]), (1, [0, 1, 0, 0]), (2, [0, 1, 1, 0]), (3, [0, 1, 1, 1]), (4, [1, 1, 1, 1])]
)
def test_static_topk_keep_hand_values(k_prime, expected):
    np.testing.assert_array_equal(P.static_topk_keep(W, k_prime), _keep(expected))


def test_normalized_entropy_hand_values():
    probs = jnp.array([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]], jnp.float32)
    np.testing.assert_allclose(P.normalized_entropy(probs), [1.0, 0.0, 0.5], atol=1e-6)


def test_entropy_adaptive_keep_hand_values():
    # E = 4, K = 4, k = floor(k_min + h * (4 - k_min) + 0.5). Rows: h = 1, 0, 0.5, log(3)/log(4) = 0.792.
    probs = jnp.array([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0]], jnp.float32)
    w = jnp.tile(W, (4, 1))
    # k_min = 1: k = 4, 1, (2.5: a rounding boundary, not asserted), floor(3.877) = 3
    keep = P.entropy_adaptive_keep(probs, w, k_min=1)
    np.testing.assert_array_equal(keep[jnp.array([0, 1, 3])], _keep([1, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1]))
    # k_min = 2: k = 4, 2, floor(3.5) = 3, floor(4.08) = 4
    np.testing.assert_array_equal(
        P.entropy_adaptive_keep(probs, w, k_min=2), _keep([1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1])
    )
    # k_min = K is plain Top-K
    np.testing.assert_array_equal(P.entropy_adaptive_keep(probs, w, k_min=4), np.ones((4, 4), bool))


# ----------------------------------------------------------------------------- dynamic-skip calibration


def test_calibrate_dynamic_skip_beta_hand_values():
    # K = 2, unsorted rows; ratios w2/w1 = 1, 1/4, 2/3, 1/3, 1/9 -> median 1/3
    wc = jnp.array([[0.5, 0.5], [0.2, 0.8], [0.6, 0.4], [0.75, 0.25], [0.1, 0.9]], jnp.float32)
    np.testing.assert_allclose(P.calibrate_dynamic_skip_beta(wc), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(P.calibrate_dynamic_skip_beta(wc, 0.0), 1 / 9, rtol=1e-6)
    np.testing.assert_allclose(P.calibrate_dynamic_skip_beta(wc, 1.0), 1.0, rtol=1e-6)
    # padding excluded: without token 3 (ratio 1/3) the median of {1, 1/4, 2/3, 1/9} is (1/4 + 2/3) / 2
    valid = jnp.array([1, 1, 1, 0, 1], bool)
    np.testing.assert_allclose(P.calibrate_dynamic_skip_beta(wc, 0.5, valid=valid), (1 / 4 + 2 / 3) / 2, rtol=1e-6)
    # per layer: [L, N, K] -> [L]
    betas = P.calibrate_dynamic_skip_beta(jnp.stack([wc, wc[::-1] * 2]))
    np.testing.assert_allclose(betas, [1 / 3, 1 / 3], rtol=1e-6)


def test_calibrate_dynamic_skip_beta_rank_choices_k3():
    # sorted rows (1, 1/2, 1/4) and (1, 1/4, 1/8) up to scale; rank-2 ratios {1/2, 1/4}, rank-3 {1/4, 1/8}
    wc = jnp.array([[0.4, 0.1, 0.2], [0.125, 0.0625, 0.5]], jnp.float32)
    np.testing.assert_allclose(P.calibrate_dynamic_skip_beta(wc, 0.5), 0.375, rtol=1e-6)
    np.testing.assert_allclose(P.calibrate_dynamic_skip_beta(wc, 0.5, rank=3), 0.1875, rtol=1e-6)
    # pooled: {1/2, 1/4, 1/4, 1/8} -> median 1/4
    np.testing.assert_allclose(P.calibrate_dynamic_skip_beta(wc, 0.5, rank=None), 0.25, rtol=1e-6)
    with pytest.raises(ValueError):
        P.calibrate_dynamic_skip_beta(wc, 0.5, rank=4)


@pytest.mark.parametrize("q", [0.2, 0.5, 0.8])
def test_calibrated_beta_drops_the_quantile_fraction_of_second_experts(q):
    out = _random_router(5, T=1001, E=8, K=2)
    beta = P.calibrate_dynamic_skip_beta(out["weights"], q)
    keep = P.dynamic_skip_keep(out["weights"], beta)
    dropped = 1 - float(jnp.mean(jnp.sum(keep, -1) - 1))
    assert abs(dropped - q) <= 2 / 1001


# ----------------------------------------------------------------------------- properties on random outputs


@pytest.mark.parametrize("name", sorted(P.POLICIES))
def test_policies_do_not_assume_sorted_candidates(name):
    """Permuting the K axis of the router outputs permutes the keep mask the same way."""
    out = _random_router(7)
    policy = P.POLICIES[name]
    knob = {} if policy.knob is None else {policy.knob: policy.grid(4)[len(policy.grid(4)) // 2]}
    keep = P.policy_keep(name, **out, **knob)
    perm = np.array([2, 0, 3, 1])
    permuted = {k: (v if k == "router_probs" else v[:, perm]) for k, v in out.items()}
    np.testing.assert_array_equal(P.policy_keep(name, **permuted, **knob), np.asarray(keep)[:, perm])
    assert keep.shape == out["weights"].shape and keep.dtype == jnp.bool_


@pytest.mark.parametrize("name", sorted(n for n in P.POLICIES if P.POLICIES[n].knob is not None))
def test_expert_count_is_monotone_in_the_knob(name):
    out = _random_router(8)
    policy = P.POLICIES[name]
    counts = [float(jnp.sum(P.policy_keep(name, **out, **{policy.knob: v}))) for v in policy.grid(4)]
    increasing = policy.knob in ("p", "k_prime", "k_min")  # tau and beta: more sparsity as they grow
    diffs = np.diff(counts)
    assert np.all(diffs >= 0) if increasing else np.all(diffs <= 0), counts
    assert counts[0] != counts[-1], "the default grid should actually move the expert count"


@pytest.mark.parametrize("name", ["top_p", "dynamic_skip", "static_topk", "entropy"])
def test_training_free_baselines_always_keep_the_top1(name):
    out = _random_router(9)
    policy = P.POLICIES[name]
    keep = P.policy_keep(name, **out, **{policy.knob: policy.grid(4)[0]})
    top1 = P.candidate_ranks(out["weights"]) == 0
    assert bool(jnp.all(keep | ~top1))


def test_policies_jit_with_traced_knob():
    out = _random_router(10)
    for name, policy in P.POLICIES.items():
        if policy.knob is None:
            continue
        v = policy.grid(4)[1]
        f = jax.jit(lambda o, x, name=name, knob=policy.knob: P.policy_keep(name, **o, **{knob: x}))
        np.testing.assert_array_equal(f(out, v), P.policy_keep(name, **out, **{policy.knob: v}))


# ----------------------------------------------------------------------------- registry


def test_registry_is_consistent():
    assert set(P.POLICIES) == {"beam", "top_p", "dynamic_skip", "static_topk", "entropy"}
    for name, policy in P.POLICIES.items():
        params = inspect.signature(policy.fn).parameters
        assert all(i in params and i in P.ROUTER_OUTPUTS for i in policy.inputs), name
        if policy.knob is None:
            assert policy.grid(8) == ()
        else:
            assert policy.knob in params and len(policy.grid(8)) >= 3, name
    assert P.POLICIES["static_topk"].grid(8) == (1, 2, 3, 4, 5, 6, 7)
    cal = P.POLICIES["dynamic_skip"].calibration
    assert cal.knob == "quantile" and cal.knob in inspect.signature(cal.fn).parameters


def test_policy_keep_dispatch_and_errors():
    np.testing.assert_array_equal(P.policy_keep("dynamic_skip", weights=W, m_hat=W, beta=0.5), _keep([0, 1, 1, 0]))
    np.testing.assert_array_equal(P.policy_keep("beam", m_hat=jnp.full((1, 4), 0.5)), _keep([1, 1, 1, 1]))
    with pytest.raises(TypeError, match="unknown"):
        P.policy_keep("top_p", probs_topk=W, p=0.5, beta=0.3)
    with pytest.raises(TypeError, match="needs"):
        P.policy_keep("top_p", weights=W, p=0.5)
    with pytest.raises(KeyError):
        P.policy_keep("nope", weights=W)
