"""BEAM (Binary Expert Activation Masking) as pure functions: mask, straight-through estimator, losses.

One MoE layer, T tokens (any leading batch dims flattened by the caller), E experts, Top-K candidates:

    router_logits [T, E]  the main router's logits (any float dtype)
    expert_ids    [T, K]  int32, the Top-K experts chosen from them
    weights       [T, K]  the combine weights g of those candidates (after the model's own Top-K normalisation)
    mask_logits   [T, E]  x @ W_m^T (+ b_m), the mask router's logits, computed by the caller
    m_hat         [T, K]  float32, sigmoid of the mask logits at the Top-K candidates
    valid         [T]     bool or 0/1 float, False for padding tokens (optional everywhere)

The forward pass of a BEAM layer is

    m_hat = mask_probs(mask_logits, expert_ids)
    m     = ste_mask(m_hat, tau)          # exactly 0.0/1.0 forward, identity gradient to m_hat
    g_hat = apply_mask(weights, m)        # g * m, no renormalisation by default

and training minimises ``total_loss(lm, bal, reg, alpha, beta) = lm + alpha * bal + beta * reg``.
A zero-initialised W_m gives m_hat = 0.5 >= tau = 0.5 everywhere, so step 0 is exactly Top-K.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = [
    "mask_probs",
    "hard_mask",
    "ste_mask",
    "apply_mask",
    "kept_fraction",
    "reg_loss",
    "load_balancing_stats",
    "load_balancing_from_stats",
    "load_balancing_loss",
    "load_balancing_loss_layers",
    "load_balancing_loss_per_layer",
    "expert_load_min_over_mean",
    "lm_loss",
    "next_token_accuracy",
    "distill_loss",
    "BetaController",
    "total_loss",
]


def _valid_weights(valid, shape):
    """[T] valid (bool/float or None) -> float32 weights of `shape` (ones when None)."""
    return jnp.ones(shape, jnp.float32) if valid is None else valid.astype(jnp.float32).reshape(shape)


def _safe_div(num, den):
    """num / den, 0 where den == 0 (and no NaN in the gradient)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


# ----------------------------------------------------------------------------- the mask


def mask_probs(mask_logits, expert_ids):
    """m_hat = sigmoid(mask_logits) at the Top-K candidates.

    mask_logits [..., E] float (any dtype), expert_ids [..., K] int -> m_hat [..., K] float32.
    Only the K gathered logits receive gradient.
    """
    z = jnp.take_along_axis(mask_logits, expert_ids.astype(jnp.int32), axis=-1)
    return jax.nn.sigmoid(z.astype(jnp.float32))


DEFAULT_TAU = 0.5  # the paper's threshold; sigmoid(0) = 0.5, so zero-initialised mask routers keep every pair


def hard_mask(m_hat, tau=DEFAULT_TAU):
    """Binarised mask 1[m_hat >= tau]: m_hat [..., K] float, tau scalar -> bool [..., K]."""
    return m_hat >= tau


@jax.custom_jvp
def ste_mask(m_hat, tau=DEFAULT_TAU):
    """Straight-through mask: forward value is exactly hard_mask(m_hat, tau) as 0.0/1.0 in m_hat's dtype;
    the derivative w.r.t. m_hat is the identity (as ``m_hat + stop_gradient(hard - m_hat)``), none w.r.t. tau.

    m_hat [..., K] float, tau scalar (Python or traced) -> [..., K] m_hat.dtype.
    Written as a custom JVP (not the add/subtract form) so the forward value is 0 or 1 bit for bit.
    """
    return hard_mask(m_hat, tau).astype(m_hat.dtype)


@ste_mask.defjvp
def _ste_mask_jvp(primals, tangents):
    m_hat, tau = primals
    m_hat_dot, _ = tangents
    return ste_mask(m_hat, tau), m_hat_dot


def apply_mask(weights, m, renormalize=False, eps=1e-9):
    """g_hat = g * m over the Top-K candidates.

    weights [..., K] float; m [..., K] bool (inference) or float 0/1 (the STE mask, carries the gradient).
    Returns [..., K] in the promoted dtype of weights and m (weights' dtype for a bool mask).
    With all m = 1 the result equals `weights` bit for bit.

    renormalize=True rescales the kept weights so they sum to what all K weights summed to
    (= 1 for models that normalise their Top-K weights, e.g. Mixtral, Qwen3; the raw softmax mass for
    Qwen1.5-MoE and DeepSeek-V2). A row whose kept sum is <= eps (all dropped) gives zeros, no NaN.
    """
    g_hat = weights * (m.astype(weights.dtype) if m.dtype == jnp.bool_ else m)
    if not renormalize:
        return g_hat
    kept = jnp.sum(g_hat, axis=-1, keepdims=True)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    ok = kept > eps
    return jnp.where(ok, g_hat * (total / jnp.where(ok, kept, 1)), jnp.zeros_like(g_hat))


def kept_fraction(keep, valid=None):
    """Fraction of Top-K (token, candidate) pairs kept = mean K_eff / K.

    keep [T, K] bool or 0/1 float, valid [T] optional -> float32 scalar (0 when no valid token).
    """
    w = _valid_weights(valid, keep.shape[:-1])[..., None]
    return _safe_div(jnp.sum(keep.astype(jnp.float32) * w), jnp.sum(w) * keep.shape[-1])


def reg_loss(m_hat, valid=None):
    """L_reg = mean of m_hat over the Top-K candidates of the (valid) tokens.

    m_hat [T, K] float, valid [T] optional -> float32 scalar. The caller averages over layers.
    """
    return kept_fraction(m_hat.astype(jnp.float32), valid)


# ----------------------------------------------------------------------------- load balancing


def load_balancing_stats(router_logits, expert_ids, num_experts, valid=None):
    """The sums behind the Switch/Mixtral auxiliary loss for one layer.

    router_logits [..., E] float, expert_ids [..., K] int, valid [...] optional (leading dims flattened) ->
    (counts [E] float32: number of Top-K assignments per expert over valid tokens,
     prob_sum [E] float32: sum over valid tokens of softmax(router_logits),
     rows float32 scalar: number of valid tokens).
    Summed over layers and passed to `load_balancing_from_stats` they give transformers' multi-layer loss.
    """
    logits = router_logits.reshape(-1, router_logits.shape[-1]).astype(jnp.float32)
    ids = expert_ids.reshape(logits.shape[0], -1)
    w = _valid_weights(valid, (logits.shape[0],))
    probs = jax.nn.softmax(logits, axis=-1)
    counts = jnp.zeros((num_experts,), jnp.float32).at[ids].add(jnp.broadcast_to(w[:, None], ids.shape))
    return counts, jnp.sum(probs * w[:, None], axis=0), jnp.sum(w)


def load_balancing_from_stats(counts, prob_sum, rows, num_experts):
    """E * sum_e (counts_e / rows) * (prob_sum_e / rows) from (possibly layer-summed) `load_balancing_stats`;
    0 when rows is 0. Lets a scanned model carry the three sums instead of every layer's logits."""
    rows = jnp.where(rows > 0, rows, 1)
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))


def _ids_or_topk(router_logits, expert_ids, top_k):
    if expert_ids is None:
        return jax.lax.top_k(router_logits.astype(jnp.float32), top_k)[1]
    if expert_ids.shape[-1] != top_k:
        raise ValueError(f"expert_ids has {expert_ids.shape[-1]} candidates, top_k is {top_k}")
    return expert_ids


def load_balancing_loss(router_logits, expert_ids, num_experts, top_k, valid=None):
    """Switch/Mixtral auxiliary loss of ONE layer, as transformers' ``load_balancing_loss_func`` computes it
    for a one-element tuple:

        E * sum_e (count_e / T) * (mean_t softmax(logits)_te),   count_e = Top-K assignments to e,

    over valid tokens only. router_logits [T, E], expert_ids [T, K] int or None (then the Top-K of the
    logits, as transformers does), valid [T] optional -> float32 scalar (equals top_k when perfectly uniform).

    Averaging this over layers is NOT transformers' multi-layer value (which pools the counts and
    probabilities of all layers before multiplying): use `load_balancing_loss_layers` for that.
    """
    ids = _ids_or_topk(router_logits, expert_ids, top_k)
    return load_balancing_from_stats(*load_balancing_stats(router_logits, ids, num_experts, valid), num_experts)


def load_balancing_loss_layers(router_logits, expert_ids, num_experts, top_k, valid=None):
    """transformers' ``load_balancing_loss_func`` over all layers (its tuple of per-layer logits concatenated).

    router_logits [L, T, E] (or a list of L [T, E]), expert_ids [L, T, K] / list / None, valid [T] optional
    (the same flattened attention mask for every layer) -> float32 scalar. Counts, probability sums and
    row counts are pooled over layers, then multiplied: this is the value transformers adds to the
    LM loss times ``router_aux_loss_coef``.
    """
    logits, ids = _stack_layers(router_logits, expert_ids, top_k)
    stats = jax.vmap(load_balancing_stats, in_axes=(0, 0, None, None))(logits, ids, num_experts, valid)
    counts, prob_sum, rows = (jnp.sum(s, axis=0) for s in stats)
    return load_balancing_from_stats(counts, prob_sum, rows, num_experts)


def _stack_layers(router_logits, expert_ids, top_k):
    logits = jnp.stack(list(router_logits)) if isinstance(router_logits, (list, tuple)) else router_logits
    if expert_ids is None:
        return logits, jax.lax.top_k(logits.astype(jnp.float32), top_k)[1]
    ids = jnp.stack(list(expert_ids)) if isinstance(expert_ids, (list, tuple)) else expert_ids
    return logits, _ids_or_topk(logits, ids, top_k)


def load_balancing_loss_per_layer(router_logits, expert_ids, num_experts, top_k, valid=None):
    """The mean over layers of each layer's own Switch loss (`load_balancing_loss`), as Switch Transformer and
    DeepSeek apply it (they sum; the mean keeps the scale of one layer: top_k when perfectly uniform).

    Unlike `load_balancing_loss_layers` (transformers' pooled value), an expert starved in one layer is not
    hidden by the same expert's surplus in another: each layer is pushed towards its own uniform load.
    router_logits [L, T, E] (or a list), expert_ids [L, T, K] / list / None, valid [T] optional -> float32 scalar.
    """
    logits, ids = _stack_layers(router_logits, expert_ids, top_k)
    per_layer = jax.vmap(lambda lg, i: load_balancing_from_stats(*load_balancing_stats(lg, i, num_experts, valid),
                                                                   num_experts))(logits, ids)
    return jnp.mean(per_layer)


def expert_load_min_over_mean(expert_ids, num_experts, valid=None):
    """Per layer, the least-loaded expert's Top-K assignments over the mean (1 = perfectly balanced, 0 = an
    expert never chosen). expert_ids [L, T, K] int (or a list of [T, K]), valid [T] optional -> [L] float32."""
    ids = jnp.stack(list(expert_ids)) if isinstance(expert_ids, (list, tuple)) else expert_ids
    w = _valid_weights(valid, (ids.shape[1],))

    def one(i):
        counts = jnp.zeros((num_experts,), jnp.float32).at[i].add(jnp.broadcast_to(w[:, None], i.shape))
        mean = jnp.sum(counts) / num_experts
        return jnp.min(counts) / jnp.where(mean > 0, mean, 1)

    return jax.vmap(one)(ids)


# ----------------------------------------------------------------------------- language modelling


def _token_terms(logits, labels, loss_mask):
    logits = logits.astype(jnp.float32)
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1).astype(jnp.int32)  # -100 style ignore ids stay in range
    w = loss_mask.astype(jnp.float32)
    return logits, safe, w


def lm_loss(logits, labels, loss_mask):
    """Mean token cross-entropy in float32 over positions where loss_mask is set.

    logits [..., V] float (position t predicts labels[t]: the caller shifts), labels [...] int,
    loss_mask [...] bool/0-1 float -> (loss float32 scalar, n_tokens float32 scalar).
    loss is 0 when n_tokens is 0; sum-of-losses = loss * n_tokens for accumulation over micro-batches.
    """
    logits, safe, w = _token_terms(logits, labels, loss_mask)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    n = jnp.sum(w)
    return _safe_div(jnp.sum((lse - target) * w), n), n


def next_token_accuracy(logits, labels, loss_mask):
    """Greedy accuracy: mean over masked positions of argmax(logits) == labels.

    Same shapes as `lm_loss` -> (accuracy float32 scalar, n_tokens float32 scalar).
    """
    logits, safe, w = _token_terms(logits, labels, loss_mask)
    hit = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
    n = jnp.sum(w)
    return _safe_div(jnp.sum(hit * w), n), n


def distill_loss(logits, teacher_logits, loss_mask):
    """Mean token KL(teacher || student) in float32 over positions where loss_mask is set: the student (BEAM)
    matches the full next-token distribution of the teacher (the same model under plain Top-K), not only the
    label. Not in the paper (beam.distill weighs it against L_lm).

    logits, teacher_logits [..., V] float (the teacher's gradient is stopped), loss_mask [...] bool/0-1 float ->
    (kl float32 scalar >= 0, n_tokens float32 scalar); kl is 0 when n_tokens is 0 or the two logits agree.
    """
    s = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    w = loss_mask.astype(jnp.float32)
    n = jnp.sum(w)
    return _safe_div(jnp.sum(kl * w), n), n


# ----------------------------------------------------------------------------- total loss and beta


def total_loss(lm, bal, reg, alpha, beta):
    """L = L_lm + alpha * L_bal + beta * L_reg (all scalars; alpha, beta Python floats or traced scalars)."""
    return lm + alpha * bal + beta * reg


@dataclasses.dataclass(frozen=True)
class BetaController:
    """Adapts beta towards a target activation ratio (kept fraction of Top-K pairs). Not in the paper.

    State is beta itself, a float32 scalar. One update, in log space:

        beta <- clip(beta * exp(rate * (observed - target) / target), beta_min, beta_max)

    so too many kept pairs (observed > target) raise beta, too few lower it, and the step is relative
    to the target. Pure and jit-able: `observed`, `target` and `rate` may be traced scalars. Feed it a
    smoothed ratio (e.g. an EMA of `kept_fraction`) if single batches are noisy.

    beta_min must be > 0 (a multiplicative update cannot leave 0).
    """

    beta_min: float = 1e-4  # floor for beta, > 0
    beta_max: float = 10.0  # ceiling for beta

    def __post_init__(self):
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    def init(self, beta):
        """Initial state: beta as a float32 scalar, clipped into [beta_min, beta_max]."""
        return jnp.clip(jnp.asarray(beta, jnp.float32), self.beta_min, self.beta_max)

    def update(self, state, observed_ratio, target, rate=0.1):
        """New beta from the current beta, the observed kept fraction and the target fraction (both in (0, 1])."""
        err = (jnp.asarray(observed_ratio, jnp.float32) - target) / target
        beta = jnp.maximum(state, self.beta_min) * jnp.exp(rate * err)
        return jnp.clip(beta, self.beta_min, self.beta_max).astype(jnp.float32)
