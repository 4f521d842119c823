"""Mask hooks: what acts between the router's Top-K and the expert compute, in every MoE block.

A hook is a frozen dataclass and a pytree: its knobs (tau, a policy's knob, per-layer values) are leaves, so a
jitted evaluation traces them and a sweep over a knob compiles once; its switches (train, renormalize, the
policy's name) are static. It is still hashable, so it may also be a static argument. It is called as
``hook(block, x [T, d], router_logits [T, E], weights [T, K] f32, expert_ids [T, K])`` and returning
``(keep [T, K] bool | None, weights [T, K], aux)``. `make_hook(policy, ...)` builds one from config.

- `BeamHook(train=True)`: the straight-through mask on the weights; every Top-K expert is still computed
  (keep=None) so the gradient reaches dropped ones. aux carries `m_hat` and the hard `kept` mask.
- `BeamHook(train=False)` and `PolicyHook`: a hard `keep`, so the expert path skips dropped pairs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import beam, policies


def _pytree(data_fields, meta_fields):
    def register(cls):
        return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=list(meta_fields))
    return register


@_pytree((), ())
@dataclasses.dataclass(frozen=True)
class TopKHook:
    """Plain Top-K: every candidate kept, weights unchanged."""

    def __call__(self, block, x, router_logits, weights, ids):
        return None, weights, {"kept": jnp.ones(ids.shape, bool)}


@_pytree(("tau",), ("train", "renormalize"))
@dataclasses.dataclass(frozen=True)
class BeamHook:
    tau: float = beam.DEFAULT_TAU
    train: bool = False
    renormalize: bool = False

    def __call__(self, block, x, router_logits, weights, ids):
        m_hat = beam.mask_probs(block.mask_router(x), ids)
        hard = beam.hard_mask(m_hat, self.tau)
        aux = {"m_hat": m_hat, "kept": hard}
        if self.train:
            return None, beam.apply_mask(weights, beam.ste_mask(m_hat, self.tau), self.renormalize), aux
        return hard, beam.apply_mask(weights, hard, self.renormalize), aux


def router_distribution(router_logits, spec) -> jax.Array:
    """router_logits [T, E] -> [T, E] float32 probabilities the policies read: the softmax, or for sigmoid-scored
    routers (DeepSeek-V3, GLM-4.5) the sigmoid scores normalised to sum to one."""
    logits = router_logits.astype(jnp.float32)
    if spec.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        return scores / jnp.sum(scores, axis=-1, keepdims=True)
    return jax.nn.softmax(logits, axis=-1)


@_pytree(("knob", "per_layer"), ("name", "renormalize"))
@dataclasses.dataclass(frozen=True)
class PolicyHook:
    """A training-free comparison policy (`beam_jax.policies`): name, its knob value, and optionally a
    per-layer knob (a tuple indexed by the MoE block's layer id, e.g. calibrated dynamic-skip betas)."""

    name: str
    knob: float | None = None
    per_layer: tuple[float, ...] | None = None
    renormalize: bool = False

    def __call__(self, block, x, router_logits, weights, ids):
        probs = router_distribution(router_logits, block.spec)
        outputs = dict(weights=weights, probs_topk=jnp.take_along_axis(probs, ids, axis=-1), router_probs=probs,
                       expert_ids=ids)
        pol = policies.POLICIES[self.name]
        knobs = {}
        if pol.knob is not None:
            value = self.per_layer[block.layer_idx] if self.per_layer is not None else self.knob
            if value is not None:
                knobs[pol.knob] = value
        keep = policies.policy_keep(self.name, **outputs, **knobs)
        return keep, beam.apply_mask(weights, keep, self.renormalize), {"kept": keep}


def make_hook(policy: str = "topk", *, knob=None, per_layer=None, train: bool = False, renormalize: bool = False):
    """Config -> hook. policy: topk | beam | top_p | dynamic_skip | static_topk | entropy; knob: tau for beam,
    the policy's own knob otherwise."""
    if policy == "topk":
        return TopKHook()
    if policy == "beam":
        return BeamHook(beam.DEFAULT_TAU if knob is None else float(knob), train, renormalize)
    if policy not in policies.POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; known: topk, beam, {', '.join(policies.POLICIES)}")
    return PolicyHook(policy, knob, None if per_layer is None else tuple(float(v) for v in per_layer), renormalize)


def beam_hook(beam_config, *, train: bool = False, tau: float | None = None) -> BeamHook:
    """BEAM's hook from a run config's `beam` section (tau, renormalize): the one place a run's settings
    become a hook. tau: a serving threshold other than the trained one."""
    return BeamHook(float(beam_config.tau if tau is None else tau), train, bool(beam_config.renormalize))
