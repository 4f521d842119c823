"""Gradients of beam_jax.masked_moe on the FFI kernel (its custom VJP) against the reference path's.

The kernel's backward (``ffi/masked_moe_cpu_kernel.h`` and, on a GPU, ``ffi/masked_moe_cuda.cu``: RunBwd) is
checked against ``jax.vjp`` of
``experts_reference`` (plain JAX autodiff of the per-pair gather) and against a float64 numpy loop,
for x, the combine weights and the three expert weights, on random inputs (never zeros), odd hidden
shapes, dropped pairs, repeated expert ids within a token, T = 0 and T = 1, float32 (tight tolerance)
and bfloat16 (against a float32 reference of the same rounded inputs: the kernel computes in float32).
Also: the variant without expert-weight gradients (frozen experts) gives the same dx / dweights,
vmap of the gradient, and training through ``impl="auto"`` on CPU follows the reference path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax import kernel as mm
from beam_jax.experts import EXPERT_PATHS, experts_reference, training_impl
from beam_jax.kernel import masked_moe
from procs import run_generic_isa
from test_kernel import _cuda_devices

needs_grad = pytest.mark.skipif(not mm.ffi_grad_available("cpu"),
                                reason=f"beam_jax._ffi built without the backward ({mm._FFI_IMPORT_ERROR})")

# Relative to max |reference gradient|.
REL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
ARGS = (0, 1, 2, 3, 5)  # x, w_gate, w_up, w_down, weights
NAMES = ("x", "w_gate", "w_up", "w_down", "weights")


def make(T, d, f, E, K, dtype=jnp.float32, keep_p=0.7, seed=0, repeat_ids=False):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, d)), dtype)
    wg = jnp.asarray(rng.standard_normal((E, d, f)) / np.sqrt(d), dtype)
    wu = jnp.asarray(rng.standard_normal((E, d, f)) / np.sqrt(d), dtype)
    wd = jnp.asarray(rng.standard_normal((E, f, d)) / np.sqrt(f), dtype)
    ids = rng.integers(0, E, (T, K)).astype(np.int32)
    if repeat_ids and K > 1:
        ids[:, 1] = ids[:, 0]  # the same expert twice in a token: both pairs count
    w = jnp.asarray(rng.uniform(-1.0, 1.0, (T, K)), jnp.float32)
    keep = jnp.asarray(rng.random((T, K)) < keep_p)
    dy = jnp.asarray(rng.standard_normal((T, d)), dtype)  # the output cotangent
    return (x, wg, wu, wd, jnp.asarray(ids), w, keep), dy


def vjp_of(fn, args, dy):
    x, wg, wu, wd, ids, w, keep = args

    def f(x_, wg_, wu_, wd_, w_):
        return fn(x_, wg_, wu_, wd_, ids, w_, keep)

    y, pull = jax.vjp(f, x, wg, wu, wd, w)
    return y, pull(dy)


def ffi_fn(*a):
    return masked_moe(*a, backend="ffi")


def up32(args):
    return tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args)


def assert_grads(got, want, dtype, what=""):
    for name, g, r in zip(NAMES, got, want):
        assert g.shape == r.shape, (name, g.shape, r.shape)
        g32, r32 = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.all(np.isfinite(g32)), f"{what} d{name}: not finite"
        scale = max(float(np.abs(r32).max()) if r32.size else 0.0, 1e-3)
        np.testing.assert_allclose(g32, r32, rtol=0, atol=REL[dtype] * scale, err_msg=f"{what} d{name}")


def loop_grads(args, dy):
    """The backward written out per pair in float64 numpy: the obviously-right reference."""
    x, wg, wu, wd, ids, w, keep = (np.asarray(a, np.float64) if jnp.issubdtype(a.dtype, jnp.floating)
                                   else np.asarray(a) for a in up32(args))
    dy = np.asarray(dy.astype(jnp.float32), np.float64)
    dx, dwg, dwu, dwd, dw = (np.zeros_like(a) for a in (x, wg, wu, wd, w))
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            if not keep[t, k]:
                continue
            e = int(ids[t, k])
            a, b = x[t] @ wg[e], x[t] @ wu[e]
            s = 1 / (1 + np.exp(-a))
            h = a * s * b
            dw[t, k] = dy[t] @ (h @ wd[e])
            dh = w[t, k] * (wd[e] @ dy[t])
            da, db = dh * b * s * (1 + a * (1 - s)), dh * a * s
            dx[t] += wg[e] @ da + wu[e] @ db
            dwg[e] += np.outer(x[t], da)
            dwu[e] += np.outer(x[t], db)
            dwd[e] += np.outer(h, w[t, k] * dy[t])
    return dx, dwg, dwu, dwd, dw


# (T, d, f, E, K): odd sizes, sizes crossing the tiles (MR 6, NR 16, KC 256, 64-wide blocks), one
# expert taking many rows, more kept pairs than a chunk (2048 rows).
SHAPES = [(1, 8, 12, 4, 2), (7, 13, 21, 5, 3), (33, 64, 96, 7, 2), (130, 40, 70, 6, 4),
          (61, 272, 136, 3, 2), (5, 300, 260, 4, 2), (1100, 16, 24, 3, 2)]


@needs_grad
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vjp_matches_reference(shape, dtype):
    args, dy = make(*shape, dtype=dtype, seed=sum(shape))
    y, got = jax.jit(lambda a, g: vjp_of(ffi_fn, a, g))(args, dy)
    # bfloat16: the kernel computes in float32 from the rounded inputs, so the float32 reference on
    # the same (rounded) inputs is the truth; the output rounding is bf16's.
    _, want = jax.jit(lambda a, g: vjp_of(experts_reference, a, g))(up32(args), dy.astype(jnp.float32))
    for g, a in zip(got, (args[0], args[1], args[2], args[3], args[5])):
        assert g.dtype == a.dtype
    assert_grads(got, want, dtype, str(shape))


@needs_grad
@pytest.mark.parametrize("repeat_ids", [False, True])
def test_vjp_matches_float64_loop(repeat_ids):
    args, dy = make(9, 24, 40, 5, 3, keep_p=0.6, seed=4, repeat_ids=repeat_ids)
    _, got = vjp_of(ffi_fn, args, dy)
    assert_grads(got, loop_grads(args, dy), jnp.float32, f"repeat_ids={repeat_ids}")


@needs_grad
def test_vjp_dropped_pairs_get_zero_weight_gradient_and_unused_experts_zero():
    args, dy = make(20, 16, 32, 6, 2, keep_p=0.5, seed=7)
    x, wg, wu, wd, ids, w, keep = args
    ids = jnp.where(ids == 5, 0, ids)  # expert 5 never selected
    args = (x, wg, wu, wd, ids, w, keep)
    _, (dx, dwg, dwu, dwd, dw) = vjp_of(ffi_fn, args, dy)
    assert np.all(np.asarray(dw)[~np.asarray(keep)] == 0)
    assert np.all(np.asarray(dw)[np.asarray(keep)] != 0)
    for a in (dwg, dwu, dwd):
        assert np.all(np.asarray(a[5]) == 0)
    _, want = vjp_of(experts_reference, args, dy)
    assert_grads((dx, dwg, dwu, dwd, dw), want, jnp.float32)


@needs_grad
def test_vjp_all_dropped_and_token_without_pairs():
    args, dy = make(8, 16, 24, 3, 2, seed=2)
    args = list(args)
    args[6] = args[6].at[3].set(False)
    _, got = vjp_of(ffi_fn, tuple(args), dy)
    assert np.all(np.asarray(got[0][3]) == 0)
    _, want = vjp_of(experts_reference, tuple(args), dy)
    assert_grads(got, want, jnp.float32)
    args[6] = jnp.zeros_like(args[6])
    _, got = vjp_of(ffi_fn, tuple(args), dy)
    for g in got:
        assert np.all(np.asarray(g) == 0)


@needs_grad
@pytest.mark.parametrize("T", [0, 1])
def test_vjp_zero_and_one_token(T):
    args, dy = make(T, 12, 20, 3, 2, keep_p=1.0, seed=10 + T)
    y, got = jax.jit(lambda a, g: vjp_of(ffi_fn, a, g))(args, dy)
    _, want = vjp_of(experts_reference, args, dy)
    assert y.shape == (T, 12)
    assert_grads(got, want, jnp.float32, f"T={T}")
    if T == 0:
        for g in got[1:4]:
            assert np.all(np.asarray(g) == 0)


@needs_grad
def test_frozen_expert_weights_skip_their_gradients_with_the_same_dx_and_dweights():
    args, dy = make(40, 24, 40, 5, 3, seed=3)
    x, wg, wu, wd, ids, w, keep = args
    loss = lambda x_, w_, wg_=wg: jnp.sum(masked_moe(x_, wg_, wu, wd, ids, w_, keep, backend="ffi") * dy)  # noqa: E731
    part = jax.grad(loss, argnums=(0, 1))(x, w)
    full = jax.grad(loss, argnums=(0, 1, 2))(x, w, wg)
    np.testing.assert_array_equal(np.asarray(part[0]), np.asarray(full[0]))
    np.testing.assert_array_equal(np.asarray(part[1]), np.asarray(full[1]))
    # Which backward target ran: the frozen variant has no expert-weight outputs.
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert "beam_masked_moe_bwd" in hlo and "beam_masked_moe_bwd_full" not in hlo
    hlo_full = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w, wg).as_text()
    assert "beam_masked_moe_bwd_full" in hlo_full


@needs_grad
def test_half_precision_weights_get_gradients_in_their_dtype():
    args, dy = make(11, 16, 24, 4, 2, dtype=jnp.bfloat16, seed=4)
    x, wg, wu, wd, ids, w, keep = args
    w16 = w.astype(jnp.bfloat16)
    g = jax.grad(lambda w_: jnp.sum(masked_moe(x, wg, wu, wd, ids, w_, keep, backend="ffi")
                                    .astype(jnp.float32)))(w16)
    assert g.dtype == jnp.bfloat16
    r = jax.grad(lambda w_: jnp.sum(experts_reference(*up32((x, wg, wu, wd)), ids, w_, keep)))(w)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=2e-2 * float(jnp.abs(r).max()))


@needs_grad
def test_check_grads_numerically():
    args, _ = make(6, 8, 12, 3, 2, keep_p=0.8, seed=5)
    x, wg, wu, wd, ids, w, keep = (a.astype(jnp.float32) if a.dtype == jnp.float32 else a for a in args)
    from jax.test_util import check_grads

    f = lambda x_, wg_, wd_, w_: masked_moe(x_, wg_, wu, wd_, ids, w_, keep, backend="ffi")  # noqa: E731
    check_grads(f, (x, wg, wd, w), order=1, modes=["rev"], eps=1e-2, atol=5e-2, rtol=5e-2)


@needs_grad
def test_vmap_of_grad_and_grad_of_vmap():
    B = 3
    per = [make(7, 16, 24, 4, 2, seed=30 + b) for b in range(B)]
    _, wg, wu, wd, _, _, _ = per[0][0]
    xs = jnp.stack([p[0][0] for p in per])
    ids = jnp.stack([p[0][4] for p in per])
    ws = jnp.stack([p[0][5] for p in per])
    keeps = jnp.stack([p[0][6] for p in per])
    dys = jnp.stack([p[1] for p in per])

    def loss(fn, x, wg_, i, w, k, g):
        return jnp.sum(fn(x, wg_, wu, wd, i, w, k) * g)

    for fn_name, fn in (("ffi", ffi_fn), ("reference", experts_reference)):
        pe = jax.vmap(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 3)), in_axes=(0, None, 0, 0, 0, 0))(
            xs, wg, ids, ws, keeps, dys)
        if fn_name == "ffi":
            got_pe = pe
        else:
            want_pe = pe
    for a, b in zip(got_pe, want_pe):  # per-example gradients, w_gate's included
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * float(jnp.abs(b).max()))
    summed = lambda fn: jax.grad(lambda x, wg_: jnp.sum(jax.vmap(  # noqa: E731
        lambda x_, i, w, k, g: loss(fn, x_, wg_, i, w, k, g))(x, ids, ws, keeps, dys)), argnums=(0, 1))(xs, wg)
    for a, b in zip(summed(ffi_fn), summed(experts_reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * float(jnp.abs(b).max()))


def test_every_backend_is_differentiable():
    args, dy = make(5, 8, 16, 3, 2, seed=1)
    backends = ["grouped", "reference", "dense"] + (["ffi", None] if mm.ffi_available("cpu") else [])
    _, want = vjp_of(experts_reference, args, dy)
    for backend in backends:
        _, got = vjp_of(lambda *a, b=backend: masked_moe(*a, backend=b), args, dy)
        assert_grads(got, want, jnp.float32, str(backend))


def test_kernel_expert_path_is_registered_and_auto_choice():
    assert "kernel" in EXPERT_PATHS
    if mm.ffi_grad_available("cpu"):
        assert training_impl("cpu") == "kernel"
    else:
        assert training_impl("cpu") == "dense"
    if not mm.ffi_grad_available("gpu"):
        assert training_impl("gpu") == "grouped"  # never the dense path on GPU


@needs_grad
@pytest.mark.parametrize("trainable", ["mask", "all"])
def test_training_through_auto_follows_the_reference_path(tiny_model_dir, trainable):
    """A few BEAM training steps through impl=auto (the kernel on CPU) and through the reference path:
    the same losses and the same gradients (the optimizer then keeps the parameters together)."""
    import beam_jax
    from beam_jax.configs import tiny
    from beam_jax.routing import BeamHook
    from beam_jax.experts import expert_impl
    from beam_jax.trainer import LossConfig, Trainer

    assert expert_impl("auto") == "kernel"
    tc = tiny.get_config().train
    rs = np.random.RandomState(0)
    trainers = {}
    for impl in ("auto", "reference"):
        model = beam_jax.load_pretrained(tiny_model_dir, param_dtype=None if trainable == "mask" else "float32")
        V = model.cfg.vocab_size
        trainers[impl] = Trainer(model, trainable, tc, LossConfig(hook=BeamHook(0.5, train=True),
                                                                  impl=expert_impl(impl)))
    V = trainers["auto"].model().cfg.vocab_size
    for step in range(3):
        ids = rs.randint(3, V, size=(2, 33)).astype(np.int32)
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((2, 32), np.float32)}
        grads = {}
        for impl, tr in trainers.items():
            b = tr._put(batch)
            (_, metrics), g = jax.value_and_grad(tr.loss, has_aux=True)(tr.params, tr.frozen, b, 0.1)
            grads[impl] = (float(metrics["loss"]), g)
            tr.step(batch, 0.1)
        assert abs(grads["auto"][0] - grads["reference"][0]) < 1e-4 * max(1.0, abs(grads["reference"][0])), step
        leaves_a = jax.tree.leaves(grads["auto"][1])
        leaves_r = jax.tree.leaves(grads["reference"][1])
        assert len(leaves_a) == len(leaves_r) > 0
        for a, r in zip(leaves_a, leaves_r):
            scale = max(float(jnp.abs(r).max()), 1e-6)
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=2e-3 * scale)


@needs_grad
def test_portable_cpu_backward_matches_reference():
    # The non-AVX2 build of the backward, forced through BEAM_JAX_CPU_ISA=generic.
    code = (
        "import jax.numpy as jnp\n"
        "from beam_jax import _ffi\n"
        "from tests.test_kernel_vjp import make, vjp_of, ffi_fn, up32, assert_grads\n"
        "from beam_jax.experts import experts_reference\n"
        "assert _ffi.cpu_isa() == 'generic', _ffi.cpu_isa()\n"
        "for dt in (jnp.float32, jnp.bfloat16):\n"
        "    a, dy = make(37, 40, 70, 5, 3, dtype=dt, seed=8)\n"
        "    _, got = vjp_of(ffi_fn, a, dy)\n"
        "    _, want = vjp_of(experts_reference, up32(a), dy.astype(jnp.float32))\n"
        "    assert_grads(got, want, dt)\n"
        "print('ok')\n")
    run_generic_isa(code)


@needs_grad
def test_gradient_under_remat_matches():
    args, dy = make(30, 24, 40, 5, 3, seed=9)
    x, wg, wu, wd, ids, w, keep = args
    loss = lambda x_, w_, wg_: jnp.sum(masked_moe(x_, wg_, wu, wd, ids, w_, keep, backend="ffi") * dy)  # noqa: E731
    plain = jax.grad(loss, argnums=(0, 1, 2))(x, w, wg)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(x, w, wg)
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# --- GPU: the CUDA backward targets (ffi/masked_moe_cuda.cu, RunBwd); bench/gpu_check.sh runs these ------------


needs_cuda_grad = pytest.mark.skipif(
    not _cuda_devices() or not mm.ffi_grad_available("gpu"),
    reason="needs a CUDA device and beam_jax._ffi built with CUDA (bench/gpu_check.sh runs these on the device)")

# Odd sizes (element loads), 16-byte-aligned sizes (vector loads), several M tiles per expert, 128 experts.
CUDA_SHAPES = [(1, 8, 12, 4, 2), (7, 13, 21, 5, 3), (33, 64, 96, 7, 2), (130, 40, 70, 6, 4), (5, 300, 260, 4, 2),
               (257, 128, 192, 8, 2), (64, 256, 512, 128, 8)]


def _gpu_vs_cpu_reference(args, dy):
    """(gradients of the ffi path on the GPU, gradients of experts_reference in float32 on the CPU), on the host."""
    gpu, cpu = _cuda_devices()[0], jax.devices("cpu")[0]
    _, got = jax.jit(lambda a, g: vjp_of(ffi_fn, a, g))(jax.device_put(args, gpu), jax.device_put(dy, gpu))
    _, want = jax.jit(lambda a, g: vjp_of(experts_reference, a, g))(
        jax.device_put(up32(args), cpu), jax.device_put(dy.astype(jnp.float32), cpu))
    return jax.device_get(got), jax.device_get(want)


@pytest.mark.gpu
@needs_cuda_grad
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_vjp_matches_reference(shape, dtype):
    args, dy = make(*shape, dtype=dtype, seed=sum(shape))
    got, want = _gpu_vs_cpu_reference(args, dy)
    for g, a in zip(got, (args[0], args[1], args[2], args[3], args[5])):
        assert g.dtype == a.dtype
    assert_grads(got, want, dtype, f"cuda {shape}")


@pytest.mark.gpu
@needs_cuda_grad
@pytest.mark.parametrize("repeat_ids", [False, True])
def test_cuda_vjp_matches_float64_loop_and_unused_experts_get_zero(repeat_ids):
    args, dy = make(40, 24, 40, 6, 3, keep_p=0.6, seed=4, repeat_ids=repeat_ids)
    x, wg, wu, wd, ids, w, keep = args
    ids = jnp.where(ids == 5, 0, ids)  # expert 5 never selected
    args = (x, wg, wu, wd, ids, w, keep)
    gpu = _cuda_devices()[0]
    _, got = jax.jit(lambda a, g: vjp_of(ffi_fn, a, g))(jax.device_put(args, gpu), jax.device_put(dy, gpu))
    got = jax.device_get(got)
    assert_grads(got, loop_grads(args, dy), jnp.float32, f"cuda repeat_ids={repeat_ids}")
    assert np.all(np.asarray(got[4])[~np.asarray(keep)] == 0)
    for a in got[1:4]:
        assert np.all(np.asarray(a[5]) == 0)


@pytest.mark.gpu
@needs_cuda_grad
def test_cuda_frozen_experts_and_all_dropped():
    gpu = _cuda_devices()[0]
    args, dy = make(50, 64, 96, 6, 2, dtype=jnp.bfloat16, seed=9)
    x, wg, wu, wd, ids, w, keep = jax.device_put(args, gpu)
    dy = jax.device_put(dy, gpu)
    loss = lambda x_, w_, wg_=wg, k_=keep: jnp.sum(  # noqa: E731
        masked_moe(x_, wg_, wu, wd, ids, w_, k_, backend="ffi").astype(jnp.float32) * dy.astype(jnp.float32))
    part = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    full = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, wg)
    for a, b in zip(part, full[:2]):  # dx and dweights do not depend on which target ran
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert "beam_masked_moe_bwd" in hlo and "beam_masked_moe_bwd_full" not in hlo
    none = jnp.zeros_like(keep)
    g = jax.jit(jax.grad(lambda x_, w_, wg_: loss(x_, w_, wg_, none), argnums=(0, 1, 2)))(x, w, wg)
    for a in g:
        assert np.all(np.asarray(a, np.float32) == 0)

