"""Routing: the router's Top-K (`route`) and the mask hooks that act between it and the expert compute.

Every MoE block (`moe.MoEBlock`) runs, on its T = B * S tokens,

    weights, ids, _ = route(router_logits, spec, score_bias)         # the family's own Top-K
    res = mask_hook(LayerContext(mask_router, spec, layer_idx), x, router_logits, weights, ids)
    y = experts(x, ids, res.weights, res.keep)

The hook contract (`MaskHook`): ``hook(ctx, x [T, d], router_logits [T, E], weights [T, K] f32,
expert_ids [T, K] int32) -> MaskResult``. `ctx` (`LayerContext`) is all a hook may read of its block: the
mask router's logits function, the `RouterSpec` and the layer index. `MaskResult` holds
- keep [T, K] bool | None: the pairs the expert path computes (None: every candidate, e.g. for the gradient);
- weights [T, K]: the final combine weights (a dropped pair's weight is 0);
- kept [T, K] bool: the pairs the routing keeps, always an array (all True for Top-K); FLOPs count these;
- m_hat [T, K] float32 | None: BEAM's mask probabilities (the sparsity loss reads them), None for other hooks.

A hook is a frozen dataclass and a pytree: its knobs (tau, a policy's knob, per-layer values) are leaves, so a
jitted evaluation traces them and a sweep over a knob compiles once; its switches (train, renormalize, the
policy's name) are static. It is still hashable, so it may also be a static argument. `make_hook(policy, ...)`
builds one from config.

- `TopKHook` (`TOPK`, the default everywhere): every candidate kept, weights unchanged.
- `BeamHook(train=True)`: the straight-through mask on the weights; every Top-K expert is still computed
  (keep=None) so the gradient reaches dropped ones; kept is the hard mask.
- `BeamHook(train=False)` and `PolicyHook`: a hard `keep`, so the expert path skips dropped pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from . import beam, policies
from .config import ModelConfig


def _pytree(data_fields, meta_fields):
    def register(cls):
        return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=list(meta_fields))
    return register


# ----------------------------------------------------------------------------- the router's Top-K


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """The routing arithmetic of a family (pure data; see `route`)."""

    top_k: int
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RouterSpec":
        return cls(cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.topk_method,
                   cfg.n_group, cfg.topk_group, cfg.scoring_func)


def _group_mask(group_scores, topk_group: int, experts_per_group: int):
    """group_scores [T, G] -> [T, G * experts_per_group] bool: the experts of each token's topk_group best groups."""
    T, G = group_scores.shape
    _, top_groups = jax.lax.top_k(group_scores, topk_group)
    mask = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], top_groups].set(True)
    return jnp.repeat(mask, experts_per_group, axis=1)


def route(router_logits, spec: RouterSpec, score_bias=None):
    """Scores over all experts (softmax or sigmoid), Top-K, optional renormalisation and scaling.

    router_logits [T, E] (any float dtype); score_bias [E] float32 (`noaux_tc` only: DeepSeek-V3's
    `e_score_correction_bias`) -> (weights [T, K] float32, expert_ids [T, K] int32, probs [T, E] float32 scores).
    Candidates are sorted by descending weight.
    - greedy: the K highest scores.
    - group_limited_greedy (DeepSeek-V2): only experts of the `topk_group` groups with the highest max score.
    - noaux_tc (DeepSeek-V3, GLM-4.5): `scores + score_bias` choose; groups are ranked by the sum of their two
      highest biased scores; the weights are the unbiased scores of the chosen experts.
    """
    logits = router_logits.astype(jnp.float32)
    probs = jax.nn.sigmoid(logits) if spec.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    T, E = probs.shape
    per_group = E // spec.n_group
    if spec.topk_method == "noaux_tc":
        choice = probs if score_bias is None else probs + score_bias.astype(jnp.float32)
        group_scores = jax.lax.top_k(choice.reshape(T, spec.n_group, per_group), 2)[0].sum(-1)
        choice = jnp.where(_group_mask(group_scores, spec.topk_group, per_group), choice, -jnp.inf)
        _, ids = jax.lax.top_k(choice, spec.top_k)
        weights = jnp.take_along_axis(probs, ids, axis=-1)
        order = jnp.argsort(-weights, axis=-1, stable=True)
        weights, ids = jnp.take_along_axis(weights, order, -1), jnp.take_along_axis(ids, order, -1)
    else:
        scores = probs
        if spec.topk_method == "group_limited_greedy":
            group_scores = probs.reshape(T, spec.n_group, per_group).max(-1)
            scores = jnp.where(_group_mask(group_scores, spec.topk_group, per_group), probs, 0.0)
        weights, ids = jax.lax.top_k(scores, spec.top_k)
    if spec.norm_topk_prob:
        # sigmoid scores can all be ~0: DeepSeek-V3 adds 1e-20 to the denominator
        eps = 1e-20 if spec.scoring_func == "sigmoid" else 0.0
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + eps)
    weights = weights * spec.routed_scaling_factor
    return weights, ids.astype(jnp.int32), probs


def router_distribution(router_logits, spec: RouterSpec) -> jax.Array:
    """router_logits [T, E] -> [T, E] float32 probabilities the policies read: the softmax, or for sigmoid-scored
    routers (DeepSeek-V3, GLM-4.5) the sigmoid scores normalised to sum to one."""
    logits = router_logits.astype(jnp.float32)
    if spec.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        return scores / jnp.sum(scores, axis=-1, keepdims=True)
    return jax.nn.softmax(logits, axis=-1)


# ----------------------------------------------------------------------------- the hook contract


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a hook may read of its MoE block, built by the block inside the traced call: mask_router
    (x [T, d] -> BEAM's mask logits [T, E] float32; the block's `moe.MaskRouter` also has `.at(x, expert_ids)`, the
    logits at the candidates [T, K], which BEAM's inference reads), the block's RouterSpec and its layer index."""

    mask_router: Callable[[jax.Array], jax.Array]
    spec: RouterSpec
    layer_idx: int


@_pytree(("keep", "weights", "kept", "m_hat"), ())
@dataclasses.dataclass(frozen=True)
class MaskResult:
    """A hook's result: keep [T, K] bool | None (None: the expert path computes every candidate), weights [T, K],
    kept [T, K] bool (the routing's kept pairs, always an array), m_hat [T, K] float32 | None (BEAM only)."""

    keep: jax.Array | None
    weights: jax.Array
    kept: jax.Array
    m_hat: jax.Array | None = None


# (ctx, x [T, d], router_logits [T, E], weights [T, K] float32, expert_ids [T, K] int32) -> MaskResult
MaskHook = Callable[[LayerContext, jax.Array, jax.Array, jax.Array, jax.Array], MaskResult]


# ----------------------------------------------------------------------------- the hooks


@_pytree((), ())
@dataclasses.dataclass(frozen=True)
class TopKHook:
    """Plain Top-K: every candidate kept, weights unchanged."""

    def __call__(self, ctx, x, router_logits, weights, ids):
        return MaskResult(None, weights, jnp.ones(ids.shape, bool))


TOPK = TopKHook()  # the default hook of moe.MoEBlock, model.MoECausalLM and generate


@_pytree(("tau",), ("train", "renormalize"))
@dataclasses.dataclass(frozen=True)
class BeamHook:
    tau: float = beam.DEFAULT_TAU
    train: bool = False
    renormalize: bool = False

    def __call__(self, ctx, x, router_logits, weights, ids):
        at = None if self.train else getattr(ctx.mask_router, "at", None)  # inference: the K logits alone
        m_hat = beam.mask_probs(ctx.mask_router(x), ids) if at is None else jax.nn.sigmoid(at(x, ids))
        hard = beam.hard_mask(m_hat, self.tau)
        if self.train:
            return MaskResult(None, beam.apply_mask(weights, beam.ste_mask(m_hat, self.tau), self.renormalize),
                              hard, m_hat)
        return MaskResult(hard, beam.apply_mask(weights, hard, self.renormalize), hard, m_hat)


@_pytree(("knob", "per_layer"), ("name", "renormalize"))
@dataclasses.dataclass(frozen=True)
class PolicyHook:
    """A training-free comparison policy (`beam_jax.policies`): name, its knob value, and optionally a
    per-layer knob (a tuple indexed by the MoE block's layer id, e.g. calibrated dynamic-skip betas)."""

    name: str
    knob: float | None = None
    per_layer: tuple[float, ...] | None = None
    renormalize: bool = False

    def __call__(self, ctx, x, router_logits, weights, ids):
        probs = router_distribution(router_logits, ctx.spec)
        outputs = dict(weights=weights, probs_topk=jnp.take_along_axis(probs, ids, axis=-1), router_probs=probs,
                       expert_ids=ids)
        pol = policies.POLICIES[self.name]
        knobs = {}
        if pol.knob is not None:
            value = self.per_layer[ctx.layer_idx] if self.per_layer is not None else self.knob
            if value is not None:
                knobs[pol.knob] = value
        keep = policies.policy_keep(self.name, **outputs, **knobs)
        return MaskResult(keep, beam.apply_mask(weights, keep, self.renormalize), keep)


def make_hook(policy: str = "topk", *, knob=None, per_layer=None, train: bool = False, renormalize: bool = False):
    """Config -> hook. policy: topk | beam | top_p | dynamic_skip | static_topk | entropy; knob: tau for beam,
    the policy's own knob otherwise."""
    if policy == "topk":
        return TOPK
    if policy == "beam":
        return BeamHook(beam.DEFAULT_TAU if knob is None else float(knob), train, renormalize)
    if policy not in policies.POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; known: topk, {', '.join(policies.POLICIES)}")
    return PolicyHook(policy, knob, None if per_layer is None else tuple(float(v) for v in per_layer), renormalize)


def beam_hook(beam_config, *, train: bool = False, tau: float | None = None) -> BeamHook:
    """BEAM's hook from a run config's `beam` section (tau, renormalize): the one place a run's settings
    become a hook. tau: a serving threshold other than the trained one."""
    return BeamHook(float(beam_config.tau if tau is None else tau), train, bool(beam_config.renormalize))
