"""Routed-expert compute: the SwiGLU experts of an MoE layer applied to routed (token, expert) pairs.

Every path computes, for each token t,

    y[t] = sum_k keep[t, k] * weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = expert_ids[t, k]

with the expert weights laid out input-major (``x @ w``):

    x          [T, d]      activations (any float dtype)
    w_gate     [E, d, f]   gate projection of every expert
    w_up       [E, d, f]   up projection
    w_down     [E, f, d]   down projection
    expert_ids [T, K]      int32, the Top-K experts of each token
    weights    [T, K]      combine weights (float32 or the activation dtype)
    keep       [T, K]      bool, optional: False drops the pair (BEAM's mask); default all True

Four paths, tested equal (values and gradients) in ``tests/test_experts.py``:

- ``experts_reference``: gathers each selected expert's weights per token. Obviously right, memory-hungry.
- ``experts_grouped``: sorts the pairs by expert (dropped pairs go to the end), ``jax.lax.ragged_dot``
  over the groups, scatters back. The work it does follows the kept pairs on backends whose ragged_dot
  is a real grouped GEMM (not XLA:CPU, see ../shared/INFRA.md).
- ``experts_dense``: every expert on every token, combined through a [T, E] weight matrix. It does all E
  experts' work.
- ``experts_kernel``: ``beam_jax.masked_moe`` (the FFI kernel where it is built, else ``grouped``), whose
  custom VJP runs the backward as grouped GEMMs over the same pairs: K experts per token in the forward and
  the backward. What ``model.impl="auto"`` trains with on CPU (:func:`training_impl`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["experts_reference", "experts_grouped", "experts_dense", "experts_kernel", "combine_weights",
           "training_impl", "EXPERT_PATHS"]


def _keep_or_all(keep, expert_ids):
    return jnp.ones(expert_ids.shape, bool) if keep is None else keep


def combine_weights(expert_ids, weights, keep, num_experts, dtype=jnp.float32):
    """[T, K] routing -> [T, E] combine matrix (zero for experts not selected or dropped)."""
    w = jnp.where(_keep_or_all(keep, expert_ids), weights, 0).astype(dtype)
    onehot = jax.nn.one_hot(expert_ids, num_experts, dtype=dtype)  # [T, K, E]
    return jnp.einsum("tk,tke->te", w, onehot)


def experts_reference(x, w_gate, w_up, w_down, expert_ids, weights, keep=None):
    """Per-pair gather of expert weights. Returns y [T, d] in x.dtype."""
    keep = _keep_or_all(keep, expert_ids)
    g = w_gate[expert_ids]  # [T, K, d, f]
    u = w_up[expert_ids]
    dn = w_down[expert_ids]  # [T, K, f, d]
    h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, g)) * jnp.einsum("td,tkdf->tkf", x, u)
    out = jnp.einsum("tkf,tkfd->tkd", h, dn)  # [T, K, d]
    w = jnp.where(keep, weights, 0).astype(jnp.promote_types(weights.dtype, out.dtype))
    return jnp.einsum("tkd,tk->td", out.astype(w.dtype), w).astype(x.dtype)


def experts_grouped(x, w_gate, w_up, w_down, expert_ids, weights, keep=None):
    """Sort the kept pairs by expert and run ``jax.lax.ragged_dot``. Returns y [T, d] in x.dtype.

    Dropped pairs get the sentinel id E, so the stable sort puts them after every real group; their rows
    are past ``sum(group_sizes)``, where ragged_dot leaves garbage, and are masked before the combine.
    """
    T, K = expert_ids.shape
    E = w_gate.shape[0]
    keep = _keep_or_all(keep, expert_ids)
    flat_ids = jnp.where(keep, expert_ids, E).reshape(-1).astype(jnp.int32)  # [T*K]
    order = jnp.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    token_of_row = order // K
    group_sizes = jnp.bincount(flat_ids, length=E + 1)[:E].astype(jnp.int32)
    xs = x[token_of_row]  # [T*K, d]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes)) * jax.lax.ragged_dot(xs, w_up, group_sizes)
    out = jax.lax.ragged_dot(h, w_down, group_sizes)  # [T*K, d]
    w_rows = jnp.where(sorted_ids < E, weights.reshape(-1)[order], 0)
    w_rows = w_rows.astype(jnp.promote_types(weights.dtype, out.dtype))
    out = jnp.where((sorted_ids < E)[:, None], out.astype(w_rows.dtype), 0) * w_rows[:, None]
    y = jnp.zeros((T, x.shape[-1]), out.dtype).at[token_of_row].add(out)
    return y.astype(x.dtype)


def experts_dense(x, w_gate, w_up, w_down, expert_ids, weights, keep=None):
    """All experts on all tokens, combined by a [T, E] matrix. Returns y [T, d] in x.dtype."""
    E = w_gate.shape[0]
    cw = combine_weights(expert_ids, weights, keep, E, jnp.promote_types(weights.dtype, x.dtype))
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate)) * jnp.einsum("td,edf->tef", x, w_up)
    out = jnp.einsum("tef,efd->ted", h, w_down)
    return jnp.einsum("ted,te->td", out.astype(cw.dtype), cw).astype(x.dtype)


def experts_kernel(x, w_gate, w_up, w_down, expert_ids, weights, keep=None):
    """``beam_jax.masked_moe`` with its default backend (differentiable). Returns y [T, d] in x.dtype.

    x must be float32, bfloat16 or float16 and the expert weights in x's dtype (the kernel's contract);
    weights are passed as float32."""
    from .kernel import masked_moe  # kernel imports this module

    return masked_moe(x, w_gate, w_up, w_down, expert_ids, weights.astype(jnp.float32), keep)


EXPERT_PATHS = {"reference": experts_reference, "grouped": experts_grouped, "dense": experts_dense,
                "kernel": experts_kernel}


def training_impl(platform: str | None = None) -> str:
    """The expert path ``model.impl="auto"`` trains with on ``platform`` (default: jax's default backend).

    - CPU with the FFI kernel's backward built: ``"kernel"`` (only the Top-K pairs, forward and backward;
      bench/train_step.py measures it against ``dense``: bench/results/train_step_cpu.json).
    - CPU without it: ``"dense"`` (XLA:CPU's ragged_dot is a dense per-group product, slower than dense).
    - GPU with the CUDA build: ``"kernel"`` (the CUDA forward and backward targets,
      ``kernel.ffi_grad_available("gpu")``); without it ``"grouped"`` (``jax.lax.ragged_dot``, which XLA:GPU in
      jax 0.11.2 lowers to dense products over every expert: bench/gpu_train.py's HLO check).
    """
    import jax

    from . import kernel

    platform = platform or jax.default_backend()
    if kernel.ffi_grad_available(platform):
        return "kernel"
    return "dense" if platform == "cpu" else "grouped"


def expert_impl(name: str) -> str:
    """config.model.impl -> the training path: 'auto' -> `training_impl()` (the differentiable FFI kernel on CPU
    where it is built, see bench/train_step.py); anything else forces that path."""
    return training_impl() if name == "auto" else name


def eval_impl(name: str) -> str:
    """config.model.impl -> the evaluation path: 'auto' -> "kernel" (`beam_jax.masked_moe`: only kept pairs are
    computed, the FFI kernel where it is built); anything else forces that path."""
    return "kernel" if name == "auto" else name
