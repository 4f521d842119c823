"""Masked-expert MoE: the routed SwiGLU experts applied to the kept (token, expert) pairs only.

    y[t] = sum_k keep[t, k] * weights[t, k] * down_e(silu(x[t] @ gate_e) * (x[t] @ up_e)),
           e = expert_ids[t, k]

``masked_moe`` runs one of four backends with the same semantics:

- ``"ffi"``: the fused XLA FFI kernel of ``beam_jax._ffi`` (``ffi/masked_moe_cpu.cc``,
  ``ffi/masked_moe_cuda.cu``): groups the kept pairs by expert on the device, SwiGLU grouped GEMM,
  down grouped GEMM, weighted combine. Work follows the kept pairs; an expert that no kept pair uses
  is never read. float32, bfloat16 and float16, accumulated in float32.
- ``"grouped"``, ``"reference"``, ``"dense"``: the pure-JAX paths of :mod:`beam_jax.experts`.

``backend=None`` picks ``"ffi"`` when the extension is built for the default backend's platform,
else ``"grouped"`` (``jax.lax.ragged_dot``), else ``"reference"``.

The op is differentiable on every backend (so whether ``jax.grad`` works does not depend on the
machine): the pure-JAX backends through JAX's own autodiff, ``"ffi"`` through a ``jax.custom_vjp``
whose backward is the kernel's backward target (``beam_masked_moe_bwd``, ``ffi/masked_moe_cpu_kernel.h`` and
``ffi/masked_moe_cuda.cu``):
grouped GEMMs over the same kept pairs, so the backward too computes K experts per token, not E.
It returns d(x), d(weights) (``<dy[t], expert_out[t, k]>`` for kept pairs, 0 for dropped ones) and,
only when one of the expert weights is being differentiated (``custom_vjp``'s ``symbolic_zeros``
tells), d(w_gate), d(w_up), d(w_down) (``beam_masked_moe_bwd_full``); with frozen expert weights
(BEAM's ``train.trainable=mask``) those GEMMs are skipped. Where the extension has no backward
target for the platform (an older build), the ``"ffi"`` backward is the VJP of
:func:`beam_jax.experts.experts_grouped` on the same inputs (see :func:`ffi_grad_available`).
``keep`` and ``expert_ids`` get no gradient.

It works under ``jax.jit`` and ``jax.vmap`` (a vmap over tokens with shared expert weights becomes
one kernel call over all tokens; batched expert weights run one call per example). An out-of-range
expert id in a kept pair contributes nothing on the ``"ffi"`` backend, and gets no gradient.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from beam_jax.cpu_isas import CPU_ISAS  # the CPU kernel builds, lowest first (beam_jax._ffi.cpu_isa())
from beam_jax.experts import experts_dense, experts_grouped, experts_reference

__all__ = ["masked_moe", "ffi_available", "ffi_grad_available", "default_backend", "BACKENDS",
           "FFI_DTYPES"]

BACKENDS = ("ffi", "grouped", "reference", "dense")
FFI_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_TARGET = "beam_masked_moe"
_TARGET_ALIASED = "beam_masked_moe_aliased"  # + y_init aliased to y (tests: poisoned output)
_BWD_TARGET = "beam_masked_moe_bwd"  # -> (dx, dweights)
_BWD_FULL_TARGET = "beam_masked_moe_bwd_full"  # -> (dx, dweights, dw_gate, dw_up, dw_down)

try:  # the compiled extension; a source checkout without a build still imports this module
    from beam_jax import _ffi
except ImportError as _err:  # pragma: no cover - depends on the build
    _ffi = None
    _FFI_IMPORT_ERROR: Exception | None = _err
else:
    _FFI_IMPORT_ERROR = None

if os.environ.get("BEAM_JAX_CPU_ISA", CPU_ISAS[-1]) not in CPU_ISAS:  # the C++ side would ignore a typo
    raise ValueError(f"BEAM_JAX_CPU_ISA={os.environ['BEAM_JAX_CPU_ISA']!r}: must be one of {', '.join(CPU_ISAS)} "
                     "(the most capable CPU kernel build to run; unset: the best this processor has)")

_FFI_PLATFORMS: set[str] = set()  # jax.default_backend() names with a registered kernel
_GRAD_PLATFORMS: set[str] = set()  # ... and with the backward targets too


def _register_targets() -> None:
    if _ffi is None:
        return
    cpu = _ffi.registrations()
    for name, capsule in cpu.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _FFI_PLATFORMS.add("cpu")
    if _BWD_TARGET in cpu and _BWD_FULL_TARGET in cpu:  # an older build has the forward only
        _GRAD_PLATFORMS.add("cpu")
    cuda = _ffi.cuda_registrations()
    for name, capsule in cuda.items():
        # Registering a CUDA target on a CPU-only jaxlib passes silently.
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    if cuda:
        _FFI_PLATFORMS.add("gpu")
        if _BWD_TARGET in cuda and _BWD_FULL_TARGET in cuda:
            _GRAD_PLATFORMS.add("gpu")


_register_targets()


def _is_rocm() -> bool:
    try:
        return "rocm" in jax.devices()[0].client.platform_version.lower()
    except Exception:  # noqa: BLE001 - best effort
        return False


def ffi_available(platform: str | None = None) -> bool:
    """Whether the FFI kernel is built for ``platform`` (default: ``jax.default_backend()``)."""
    platform = platform or jax.default_backend()
    if platform == "gpu" and _is_rocm():
        return False
    return platform in _FFI_PLATFORMS


def ffi_grad_available(platform: str | None = None) -> bool:
    """Whether the FFI kernel's backward targets are built for ``platform`` (default: jax's default).

    Where they are not (but the forward is), the ``"ffi"`` backend's backward is the VJP of
    :func:`beam_jax.experts.experts_grouped`."""
    platform = platform or jax.default_backend()
    return ffi_available(platform) and platform in _GRAD_PLATFORMS


def default_backend(platform: str | None = None) -> str:
    """The backend ``masked_moe(backend=None)`` uses on ``platform``."""
    if ffi_available(platform):
        return "ffi"
    if hasattr(jax.lax, "ragged_dot"):
        return "grouped"
    return "reference"


# --- validation ----------------------------------------------------------------------------------


def _shape_dtype(name, a):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise ValueError(f"masked_moe: {name} must be an array, got {type(a).__name__}")
    return tuple(a.shape), jnp.dtype(a.dtype)


def _validate(x, w_gate, w_up, w_down, expert_ids, weights, keep):
    xs, xt = _shape_dtype("x", x)
    gs, gt = _shape_dtype("w_gate", w_gate)
    us, ut = _shape_dtype("w_up", w_up)
    ds, dt = _shape_dtype("w_down", w_down)
    is_, it = _shape_dtype("expert_ids", expert_ids)
    ws, wt = _shape_dtype("weights", weights)
    if len(xs) != 2:
        raise ValueError(f"masked_moe: x must have rank 2 [T, d], got shape {xs}")
    if xt not in FFI_DTYPES:
        raise ValueError(f"masked_moe: x must be float32, bfloat16 or float16, got {xt}")
    T, d = xs
    if len(gs) != 3:
        raise ValueError(f"masked_moe: w_gate must have rank 3 [E, d, f], got shape {gs}")
    E, _, f = gs
    if gs[1] != d:
        raise ValueError(f"masked_moe: w_gate {gs} must be [E, d={d}, f] to match x {xs}")
    if us != gs:
        raise ValueError(f"masked_moe: w_up must have w_gate's shape {gs}, got {us}")
    if ds != (E, f, d):
        raise ValueError(f"masked_moe: w_down must be [E, f, d] = {(E, f, d)}, got {ds}")
    for name, t in (("w_gate", gt), ("w_up", ut), ("w_down", dt)):
        if t != xt:
            raise ValueError(f"masked_moe: {name} must have x's dtype {xt}, got {t}")
    if len(is_) != 2 or is_[0] != T:
        raise ValueError(f"masked_moe: expert_ids must be [T={T}, K], got shape {is_}")
    if it != jnp.dtype(jnp.int32):
        raise ValueError(f"masked_moe: expert_ids must be int32, got {it}")
    if ws != is_:
        raise ValueError(f"masked_moe: weights must have expert_ids' shape {is_}, got {ws}")
    if not jnp.issubdtype(wt, jnp.floating):
        raise ValueError(f"masked_moe: weights must be a float array, got {wt}")
    if keep is not None:
        ks, kt = _shape_dtype("keep", keep)
        if ks != is_:
            raise ValueError(f"masked_moe: keep must have expert_ids' shape {is_}, got {ks}")
        if kt != jnp.dtype(bool):
            raise ValueError(f"masked_moe: keep must be bool, got {kt}")


# --- the FFI op ----------------------------------------------------------------------------------


def _ffi_call_2d(x, w_gate, w_up, w_down, expert_ids, weights, keep, y_init=None):
    T, d = x.shape
    K = expert_ids.shape[1]
    if T == 0 or K == 0 or d == 0 or w_gate.shape[0] == 0 or w_gate.shape[2] == 0:
        return jnp.zeros((T, d), x.dtype)  # nothing to compute (and no zero-sized custom call)
    out = jax.ShapeDtypeStruct((T, d), x.dtype)
    args = (x, w_gate, w_up, w_down, expert_ids, weights.astype(jnp.float32), keep)
    if y_init is None:
        return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(*args)
    # y_init's buffer becomes y's: the kernel must overwrite every row of it.
    return jax.ffi.ffi_call(_TARGET_ALIASED, out, vmap_method="sequential",
                            input_output_aliases={7: 0})(*args, y_init)


@jax.custom_batching.custom_vmap
def _ffi_op(x, w_gate, w_up, w_down, expert_ids, weights, keep):
    return _ffi_call_2d(x, w_gate, w_up, w_down, expert_ids, weights, keep)


def _per_example(op, args, in_batched):
    """vmap as a loop: `op(*args)` once per example (lax.map over the batched args, the others shared)."""
    idx = [i for i, b in enumerate(in_batched) if b]

    def one(sliced):
        a = list(args)
        for i, v in zip(idx, sliced):
            a[i] = v
        return op(*a)

    return jax.lax.map(one, tuple(args[i] for i in idx))


@_ffi_op.def_vmap
def _ffi_op_vmap(axis_size, in_batched, x, w_gate, w_up, w_down, expert_ids, weights, keep):
    args = [x, w_gate, w_up, w_down, expert_ids, weights, keep]
    if any(in_batched[1:4]):  # per-example expert weights: one kernel call per example
        return _per_example(_ffi_op, args, in_batched), True
    # Shared expert weights: fold the batch into the tokens and make one call.
    tok = []
    for a, b in zip((x, expert_ids, weights, keep), (in_batched[0], *in_batched[4:])):
        a = a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
        tok.append(a.reshape(axis_size * a.shape[1], *a.shape[2:]))
    xb, ib, wb, kb = tok
    y = _ffi_op(xb, w_gate, w_up, w_down, ib, wb, kb)
    return y.reshape(axis_size, x.shape[-2] if in_batched[0] else x.shape[0], -1), True


# --- the backward ----------------------------------------------------------------------------------


def _ffi_bwd_2d(x, w_gate, w_up, w_down, expert_ids, weights, keep, dy, full):
    """(dx [T, d] x.dtype, dweights [T, K] f32[, dw_gate, dw_up, dw_down] in x.dtype)."""
    T, d = x.shape
    E, _, f = w_gate.shape
    K = expert_ids.shape[1]
    wshapes = [w_gate.shape, w_up.shape, w_down.shape] if full else []
    if T == 0 or K == 0 or d == 0 or E == 0 or f == 0:  # no zero-sized custom call
        return (jnp.zeros((T, d), x.dtype), jnp.zeros((T, K), jnp.float32),
                *(jnp.zeros(s, x.dtype) for s in wshapes))
    outs = [jax.ShapeDtypeStruct((T, d), x.dtype), jax.ShapeDtypeStruct((T, K), jnp.float32)]
    outs += [jax.ShapeDtypeStruct(s, x.dtype) for s in wshapes]
    target = _BWD_FULL_TARGET if full else _BWD_TARGET
    return tuple(jax.ffi.ffi_call(target, outs, vmap_method="sequential")(
        x, w_gate, w_up, w_down, expert_ids, weights.astype(jnp.float32), keep, dy.astype(x.dtype)))


def _make_bwd_op(full: bool):
    @jax.custom_batching.custom_vmap
    def op(x, w_gate, w_up, w_down, expert_ids, weights, keep, dy):
        return _ffi_bwd_2d(x, w_gate, w_up, w_down, expert_ids, weights, keep, dy, full)

    @op.def_vmap
    def op_vmap(axis_size, in_batched, x, w_gate, w_up, w_down, expert_ids, weights, keep, dy):
        args = [x, w_gate, w_up, w_down, expert_ids, weights, keep, dy]
        n_out = 5 if full else 2
        if full or any(in_batched[1:4]):
            # Per-example expert weights, or per-example expert-weight gradients (a vmapped
            # backward owes each example its own): one kernel call per example.
            return _per_example(op, args, in_batched), (True,) * n_out
        # Shared expert weights, token-local outputs: fold the batch into the tokens.
        tok = []
        for a, b in zip((x, expert_ids, weights, keep, dy), (in_batched[0], *in_batched[4:])):
            a = a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            tok.append(a.reshape(axis_size * a.shape[1], *a.shape[2:]))
        xb, ib, wb, kb, gb = tok
        dx, dw = op(xb, w_gate, w_up, w_down, ib, wb, kb, gb)
        return (dx.reshape(axis_size, -1, dx.shape[-1]), dw.reshape(axis_size, -1, dw.shape[-1])), \
            (True, True)

    return op


_BWD_OPS = {False: _make_bwd_op(False), True: _make_bwd_op(True)}


@jax.custom_vjp
def _ffi_diff(x, w_gate, w_up, w_down, expert_ids, weights, keep):
    return _ffi_op(x, w_gate, w_up, w_down, expert_ids, weights, keep)


def _ffi_diff_fwd(x, w_gate, w_up, w_down, expert_ids, weights, keep):
    # symbolic_zeros=True: each argument is a CustomVJPPrimal(value, perturbed).
    vals = tuple(a.value for a in (x, w_gate, w_up, w_down, expert_ids, weights, keep))
    weight_grads = w_gate.perturbed or w_up.perturbed or w_down.perturbed
    # The residual's key carries the static choice (a pytree key, not a traced value).
    return _ffi_op(*vals), {"full" if weight_grads else "partial": vals}


def _ffi_diff_bwd(res, dy):
    (kind, vals), = res.items()
    x, w_gate, w_up, w_down, expert_ids, weights, keep = vals
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        return (None,) * 7
    full = kind == "full"
    if ffi_grad_available():
        dx, dw, *dws = _BWD_OPS[full](x, w_gate, w_up, w_down, expert_ids, weights, keep, dy)
    else:  # no backward target on this platform: the grouped path's VJP on the same inputs
        def f(x_, wg_, wu_, wd_, w_):
            return experts_grouped(x_, wg_, wu_, wd_, expert_ids, w_, keep & _in_range(expert_ids, w_gate))

        _, vjp = jax.vjp(f, x, w_gate, w_up, w_down, weights.astype(jnp.float32))
        dx, dwg, dwu, dwd, dw = vjp(dy.astype(x.dtype))
        dws = [dwg, dwu, dwd] if full else []
    if not full:
        dws = [None, None, None]
    return (dx.astype(x.dtype), *dws, None, dw.astype(weights.dtype), None)


_ffi_diff.defvjp(_ffi_diff_fwd, _ffi_diff_bwd, symbolic_zeros=True)


def _in_range(expert_ids, w_gate):
    return (expert_ids >= 0) & (expert_ids < w_gate.shape[0])


_OPS = {
    "ffi": _ffi_diff,
    "grouped": experts_grouped,
    "reference": experts_reference,
    "dense": experts_dense,
}


def masked_moe(x, w_gate, w_up, w_down, expert_ids, weights, keep=None, backend=None):
    """The routed SwiGLU experts on the kept pairs. Returns y [T, d] in x's dtype.

    Args:
      x: [T, d] float32, bfloat16 or float16 activations.
      w_gate, w_up: [E, d, f] expert projections (x's dtype); w_down: [E, f, d].
      expert_ids: [T, K] int32, the selected experts of each token.
      weights: [T, K] float combine weights.
      keep: [T, K] bool, False drops the pair (BEAM's mask); None keeps every pair.
      backend: None (pick, see :func:`default_backend`), "ffi", "grouped", "reference" or "dense".

    Raises:
      ValueError: a tensor of the wrong rank, shape or dtype (named in the message), or an unknown
        backend.
      RuntimeError: ``backend="ffi"`` where the extension is not built for this platform.

    Differentiable in x, the expert weights and weights (see the module docstring).
    """
    _validate(x, w_gate, w_up, w_down, expert_ids, weights, keep)
    if backend is None:
        backend = default_backend()
    elif backend not in BACKENDS:
        raise ValueError(f"masked_moe: backend must be one of {BACKENDS} or None, got {backend!r}")
    elif backend == "ffi" and not ffi_available():
        why = f" ({_FFI_IMPORT_ERROR})" if _FFI_IMPORT_ERROR is not None else ""
        raise RuntimeError(
            f"masked_moe: the ffi backend is not built for platform {jax.default_backend()!r}{why}")
    if keep is None:
        keep = jnp.ones(expert_ids.shape, bool)
    return _OPS[backend](x, w_gate, w_up, w_down, expert_ids, weights, keep)


def _masked_moe_ffi_poisoned(x, w_gate, w_up, w_down, expert_ids, weights, keep, poison=np.nan):
    """Test hook: the ffi kernel writing into a buffer pre-filled with ``poison``.

    The output buffer is aliased to a [T, d] array full of ``poison``, so a row the kernel leaves
    unwritten keeps the poison and shows up in the result.
    """
    _validate(x, w_gate, w_up, w_down, expert_ids, weights, keep)
    y_init = jnp.full((x.shape[0], x.shape[1]), poison, x.dtype)
    return _ffi_call_2d(x, w_gate, w_up, w_down, expert_ids, weights, keep, y_init=y_init)
