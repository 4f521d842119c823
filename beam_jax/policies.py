"""Routing policies compared against BEAM, as pure functions that return which Top-K candidates to keep.

Every policy maps router outputs to ``keep`` bool [T, K] over the model's Top-K candidates, so all of
them run through the same expert-compute path (``experts.py``'s ``keep`` argument) and are counted by
the same FLOPs code. None assumes the K axis is sorted: ranks are computed from the weights (ties go
to the lower index). The router outputs a policy may read, by name:

    weights      [T, K]  combine weights of the candidates (after the model's own Top-K normalisation)
    probs_topk   [T, K]  full-softmax probabilities of the candidates (softmax over all E, not renormalised)
    router_probs [T, E]  full softmax over all experts
    m_hat        [T, K]  BEAM's mask probabilities
    expert_ids   [T, K]  int32 candidate ids (no policy here needs them; accepted and ignored)

Leading batch dims are allowed wherever T is. ``POLICIES`` names each policy, the outputs it reads, its
sweep knob and a default grid for a Pareto sweep; ``policy_keep(name, **outputs_and_knobs)`` dispatches.
Plain Top-K (every candidate kept) is no policy here: it is `beam_jax.routing.TOPK`, the default hook.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import jax.numpy as jnp

from beam_jax.beam import DEFAULT_TAU, hard_mask

__all__ = [
    "candidate_ranks",
    "beam_keep",
    "top_p_keep",
    "dynamic_skip_keep",
    "calibrate_dynamic_skip_beta",
    "static_topk_keep",
    "normalized_entropy",
    "entropy_adaptive_keep",
    "Policy",
    "Calibration",
    "POLICIES",
    "ROUTER_OUTPUTS",
    "policy_keep",
]

ROUTER_OUTPUTS = ("weights", "probs_topk", "router_probs", "m_hat", "expert_ids")


def _ahead(w):
    """ahead[..., k, j] = candidate j ranks before candidate k (larger weight, or equal and lower index)."""
    K = w.shape[-1]
    wk, wj = w[..., :, None], w[..., None, :]
    idx = jnp.arange(K)
    return (wj > wk) | ((wj == wk) & (idx[None, :] < idx[:, None]))


def candidate_ranks(w):
    """Rank of each candidate by descending weight: w [..., K] float -> int32 [..., K], 0 = largest."""
    return jnp.sum(_ahead(w), axis=-1, dtype=jnp.int32)


def _per_layer(x, ndim):
    """Scalar or per-leading-dim knob (e.g. [L] for [L, T, K] inputs) -> broadcastable to [..., T, K]."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def beam_keep(m_hat, tau=DEFAULT_TAU):
    """BEAM at inference: keep where m_hat >= tau. m_hat [..., K] float -> bool [..., K].
    A token may keep no routed expert."""
    return hard_mask(m_hat, tau)


def top_p_keep(probs_topk, p):
    """Top-P / threshold routing (Huang et al. 2024), restricted to the Top-K candidates.

    Candidates are taken in descending probability until their cumulative probability reaches p:
    candidate k is kept iff the probabilities of the candidates ranked before it sum to < p. So the kept
    set is the smallest prefix whose sum is >= p, capped at K; the top-1 is always kept (also for p <= 0).

    probs_topk [..., K] are the FULL-softmax probabilities (softmax over all E experts, gathered at the
    candidates, NOT renormalised over the K): p is a fraction of the whole router mass, as in Huang et al.,
    and when the K candidates hold less than p in total all K are kept. p scalar -> bool [..., K].
    """
    ahead = _ahead(probs_topk)
    mass_before = jnp.sum(jnp.where(ahead, probs_topk[..., None, :], 0), axis=-1)
    return (mass_before < p) | (candidate_ranks(probs_topk) == 0)


def dynamic_skip_keep(weights, beta):
    """Dynamic skipping (Lu et al. 2024): drop candidate i when w_i < beta * w_top1; the top-1 is always kept.

    weights [..., K] float (the ratio w_i / w_top1 is the same for full-softmax probabilities and for
    renormalised Top-K weights, so either may be passed); beta a scalar or one value per leading index
    (e.g. [L] for weights [L, T, K], per layer) -> bool [..., K].
    """
    w_top = jnp.max(weights, axis=-1, keepdims=True)
    beta = _per_layer(beta, weights.ndim)
    return (weights >= beta * w_top) | (candidate_ranks(weights) == 0)


def calibrate_dynamic_skip_beta(weights_calib, quantile=0.5, rank=2, valid=None):
    """Per-layer beta for `dynamic_skip_keep` from calibration tokens, as Lu et al. do.

    Lu et al. (Mixtral, K = 2) set each layer's beta to the MEDIAN over calibration tokens of w_2 / w_1
    (the second-largest over the largest routing weight). This computes the `quantile` (the knob;
    0.5 = their median) of the ratio w_(rank) / w_(1) per layer, with ranks counted from 1 by
    descending weight. rank=None pools the ratios of every non-top candidate (ranks 2..K) instead, so
    the quantile is then about the fraction of non-top candidates the calibration tokens would drop.
    For K = 2 both agree. Since dropping happens iff w_i < beta * w_1, quantile q drops the rank-2
    candidate of about a fraction q of the calibration tokens.

    weights_calib [..., N, K] float (e.g. [N, K] for one layer, [L, N, K] for all), valid [..., N] or [N]
    optional (padding excluded) -> float32 beta [...] (a scalar for one layer).
    """
    w = jnp.sort(weights_calib.astype(jnp.float32), axis=-1)[..., ::-1]
    top = w[..., :1]
    ratios = jnp.where(top > 0, w / jnp.where(top > 0, top, 1), 0)[..., 1:]  # [..., N, K-1]
    if rank is not None:
        if not 2 <= rank <= w.shape[-1]:
            raise ValueError(f"rank must be in [2, {w.shape[-1]}], got {rank}")
        ratios = ratios[..., rank - 2 : rank - 1]
    if valid is not None:
        ratios = jnp.where(jnp.broadcast_to(valid, ratios.shape[:-1])[..., None], ratios, jnp.nan)
    flat = ratios.reshape(ratios.shape[:-2] + (-1,))
    return jnp.nanquantile(flat, quantile, axis=-1)


def static_topk_keep(weights, k_prime):
    """Static Top-k' (k' < K): keep the k' highest-weight candidates of every token.

    weights [..., K] float (unsorted is fine), k_prime int (Python or traced) -> bool [..., K].
    """
    return candidate_ranks(weights) < k_prime


def normalized_entropy(router_probs):
    """Router entropy over all E experts divided by log(E): router_probs [..., E] -> float32 [...] in [0, 1]."""
    p = router_probs.astype(jnp.float32)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0)
    return jnp.clip(-jnp.sum(plogp, axis=-1) / jnp.log(p.shape[-1]), 0.0, 1.0)


def entropy_adaptive_keep(router_probs, weights, k_min=1):
    """Entropy-adaptive K: a confident router (low entropy) keeps few candidates, an unsure one keeps all K.

    Per token, h = normalized_entropy(router_probs) in [0, 1] and
        k = floor(k_min + h * (K - k_min) + 0.5)     (linear in h, rounded half up), clipped to [1, K];
    the k highest-weight candidates are kept. The knob is k_min (float allowed): h = 0 keeps k_min,
    h = 1 keeps K, k_min = K is plain Top-K.

    router_probs [..., E] (full softmax), weights [..., K] -> bool [..., K].
    """
    K = weights.shape[-1]
    h = normalized_entropy(router_probs)
    k = jnp.clip(jnp.floor(k_min + h * (K - k_min) + 0.5), 1, K)
    return candidate_ranks(weights) < k[..., None]


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How a policy's knob is set from calibration data: `fn(calibration outputs..., **{knob: value})`
    returns the policy's own knob value (e.g. quantile -> per-layer beta)."""

    fn: Callable
    inputs: tuple[str, ...]  # router outputs of the calibration data it reads
    knob: str  # the calibration knob swept instead of the policy's knob
    grid: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Policy:
    """A routing policy: fn(**inputs, knob=value) -> keep [T, K]."""

    fn: Callable
    inputs: tuple[str, ...]  # the router outputs fn reads
    knob: str | None  # the argument a Pareto sweep varies (None: nothing to sweep)
    grid: Callable[[int], tuple]  # K -> default sweep values of the knob
    calibration: Calibration | None = None


POLICIES: dict[str, Policy] = {
    "beam": Policy(beam_keep, ("m_hat",), "tau", lambda K: (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
    "top_p": Policy(
        top_p_keep, ("probs_topk",), "p", lambda K: (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    ),
    "dynamic_skip": Policy(
        dynamic_skip_keep,
        ("weights",),
        "beta",
        lambda K: (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        Calibration(
            calibrate_dynamic_skip_beta, ("weights",), "quantile", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        ),
    ),
    "static_topk": Policy(static_topk_keep, ("weights",), "k_prime", lambda K: tuple(range(1, K))),
    "entropy": Policy(entropy_adaptive_keep, ("router_probs", "weights"), "k_min", lambda K: tuple(range(1, K))),
}


def policy_keep(name, **kwargs):
    """keep = POLICIES[name].fn(...), taking what it needs from `kwargs`.

    kwargs may hold any of ROUTER_OUTPUTS (those the policy does not read are ignored, so a caller can
    pass the same router outputs to every policy) plus the policy's own arguments (its knob, e.g.
    ``tau=0.7``); a knob left out takes the function's default where it has one. Anything else raises
    TypeError, as does a router output the policy reads but was not given.
    """
    policy = POLICIES[name]
    params = inspect.signature(policy.fn).parameters
    unknown = set(kwargs) - set(params) - set(ROUTER_OUTPUTS)
    if unknown:
        raise TypeError(f"policy {name!r} got unknown arguments {sorted(unknown)}")
    missing = [i for i in policy.inputs if i not in kwargs]
    if missing:
        raise TypeError(f"policy {name!r} needs router outputs {missing}")
    return policy.fn(**{k: v for k, v in kwargs.items() if k in params})
