"""The masked-expert kernel (beam_jax.masked_moe) against beam_jax.experts.experts_reference.

CPU tests run the FFI kernel built into beam_jax._ffi; the GPU tests run the same checks on a CUDA
device and skip (with the reason) where there is none. Unwritten output rows are caught by running
the kernel into a buffer pre-filled with NaN (the output aliases it), so any row the kernel fails
to write stays NaN.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax import kernel as mm
from beam_jax.experts import experts_reference
from beam_jax.kernel import masked_moe
from procs import run_generic_isa

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# Error bound relative to max |reference|: f32 accumulation on both sides; the half references
# round intermediates (h, the expert outputs) to the half type, the kernel keeps more in f32.
REL_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}

needs_ffi = pytest.mark.skipif(not mm.ffi_available("cpu"),
                               reason=f"beam_jax._ffi not built ({mm._FFI_IMPORT_ERROR})")


def _cuda_devices():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


needs_cuda = pytest.mark.skipif(
    not _cuda_devices() or not mm.ffi_available("gpu"),
    reason="needs a CUDA device and beam_jax._ffi built with CUDA")


def make_inputs(T, d, f, E, K, dtype=jnp.float32, keep_p=0.7, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, d)), dtype)
    w_gate = jnp.asarray(rng.standard_normal((E, d, f)) / np.sqrt(d), dtype)
    w_up = jnp.asarray(rng.standard_normal((E, d, f)) / np.sqrt(d), dtype)
    w_down = jnp.asarray(rng.standard_normal((E, f, d)) / np.sqrt(f), dtype)
    ids = jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32)
    weights = jnp.asarray(rng.random((T, K)), jnp.float32)
    keep = jnp.asarray(rng.random((T, K)) < keep_p)
    return x, w_gate, w_up, w_down, ids, weights, keep


def assert_matches(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    y32 = np.asarray(y.astype(jnp.float32))
    r32 = np.asarray(ref.astype(jnp.float32))
    assert np.all(np.isfinite(y32)), "non-finite output (unwritten or poisoned rows?)"
    scale = max(float(np.max(np.abs(r32))) if r32.size else 0.0, 1e-3)
    np.testing.assert_allclose(y32, r32, rtol=0, atol=REL_TOL[dtype] * scale)


# Shapes (T, d, f, E, K): one token, odd sizes, E not a power of two, sizes that cross the CPU
# kernel's tiles (MR 6, NR 16, KC 256, 64-column units), few rows per expert with d and f large
# enough to split the streamed weights into slabs, and more kept pairs than one chunk (2048).
SHAPES = [(1, 8, 12, 4, 2), (7, 13, 21, 5, 3), (33, 64, 96, 7, 2), (130, 40, 70, 6, 4),
          (61, 272, 136, 3, 2), (3, 300, 260, 6, 2), (1100, 16, 24, 3, 2)]


@needs_ffi
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    args = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    y = masked_moe(*args, backend="ffi")
    assert_matches(y, experts_reference(*args), dtype)


@needs_ffi
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
def test_poisoned_output_rows_all_written(dtype):
    # Tokens 0, 5 and 9 have every pair dropped: their rows must be written as zeros, not left.
    args = list(make_inputs(12, 24, 40, 5, 3, dtype=dtype, seed=3))
    args[6] = args[6].at[jnp.array([0, 5, 9])].set(False)
    y = mm._masked_moe_ffi_poisoned(*args)
    ref = experts_reference(*args)
    assert_matches(y, ref, dtype)
    assert np.all(np.asarray(y[jnp.array([0, 5, 9])].astype(jnp.float32)) == 0)


@needs_ffi
def test_poisoned_output_detects_unwritten_rows():
    # The check itself: a NaN-initialised buffer that nobody writes stays NaN.
    y_init = jnp.full((3, 4), jnp.nan, jnp.float32)
    assert np.all(np.isnan(np.asarray(y_init)))
    y = mm._masked_moe_ffi_poisoned(*make_inputs(3, 4, 8, 2, 1, seed=1))
    assert np.all(np.isfinite(np.asarray(y)))


@needs_ffi
def test_zero_tokens():
    args = make_inputs(0, 16, 24, 4, 2)
    y = masked_moe(*args, backend="ffi")
    assert y.shape == (0, 16) and y.dtype == jnp.float32
    assert jax.jit(lambda *a: masked_moe(*a, backend="ffi"))(*args).shape == (0, 16)


@needs_ffi
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
def test_all_pairs_dropped(dtype):
    args = list(make_inputs(9, 16, 24, 4, 2, dtype=dtype))
    args[6] = jnp.zeros_like(args[6])
    for y in (masked_moe(*args, backend="ffi"), mm._masked_moe_ffi_poisoned(*args)):
        assert y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), 0.0)


@needs_ffi
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
def test_one_expert_takes_every_pair(dtype):
    args = list(make_inputs(50, 32, 48, 5, 3, dtype=dtype, keep_p=1.0, seed=7))
    args[4] = jnp.full_like(args[4], 3)
    assert_matches(masked_moe(*args, backend="ffi"), experts_reference(*args), dtype)


@needs_ffi
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
def test_busy_and_rare_experts_together(dtype):
    # Expert 0 takes every token's first pair (many rows: the blocked GEMM), the others share the
    # second pairs (a few rows each: the streaming path); both add into the same output rows.
    x, wg, wu, wd, ids, w, keep = make_inputs(40, 300, 260, 8, 2, dtype=dtype, seed=12)
    ids = ids.at[:, 0].set(0).at[:, 1].set(1 + ids[:, 1] % 7)
    args = (x, wg, wu, wd, ids, w, keep)
    assert_matches(masked_moe(*args, backend="ffi"), experts_reference(*args), dtype)


@needs_ffi
def test_unused_and_dropped_experts_are_not_read():
    # Expert 1 is never selected and expert 2 only by dropped pairs: NaN weights there must not
    # reach the output (a kernel computing them and multiplying by 0 would give NaN).
    x, wg, wu, wd, ids, w, keep = make_inputs(20, 16, 32, 4, 2, keep_p=1.0, seed=5)
    ids = jnp.where(ids == 1, 0, ids)
    keep = keep & (ids != 2)
    clean = experts_reference(x, wg, wu, wd, jnp.where(keep, ids, 0), w, keep)
    for e in (1, 2):
        wg, wu, wd = wg.at[e].set(jnp.nan), wu.at[e].set(jnp.nan), wd.at[e].set(jnp.nan)
    y = masked_moe(x, wg, wu, wd, ids, w, keep, backend="ffi")
    assert_matches(y, clean, jnp.float32)


@needs_ffi
def test_out_of_range_ids_in_kept_pairs_contribute_nothing():
    x, wg, wu, wd, ids, w, keep = make_inputs(10, 16, 24, 4, 2, keep_p=1.0, seed=2)
    bad = ids.at[0, 0].set(4).at[3, 1].set(-1)
    ref = experts_reference(x, wg, wu, wd, ids, w, keep.at[0, 0].set(False).at[3, 1].set(False))
    assert_matches(masked_moe(x, wg, wu, wd, bad, w, keep, backend="ffi"), ref, jnp.float32)


@needs_ffi
def test_keep_none_means_all_kept_and_half_weights():
    x, wg, wu, wd, ids, w, _ = make_inputs(11, 16, 24, 4, 2, dtype=jnp.bfloat16, seed=4)
    w16 = w.astype(jnp.bfloat16)
    y = masked_moe(x, wg, wu, wd, ids, w16, backend="ffi")
    assert_matches(y, experts_reference(x, wg, wu, wd, ids, w16), jnp.bfloat16)


@needs_ffi
@pytest.mark.parametrize("backend", ["ffi", "grouped", "reference", "dense"])
def test_backends_agree_under_jit(backend):
    args = make_inputs(17, 24, 40, 6, 2, seed=11)
    y = jax.jit(lambda *a: masked_moe(*a, backend=backend))(*args)
    assert_matches(y, experts_reference(*args), jnp.float32)


@needs_ffi
def test_default_backend_is_ffi_on_cpu():
    assert mm.default_backend("cpu") == "ffi"
    args = make_inputs(5, 8, 16, 3, 2)
    np.testing.assert_array_equal(np.asarray(masked_moe(*args)),
                                  np.asarray(masked_moe(*args, backend="ffi")))


@needs_ffi
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
def test_vmap_shared_weights(dtype):
    B, T, d, f, E, K = 3, 9, 16, 24, 5, 2
    x, wg, wu, wd, _, _, _ = make_inputs(T, d, f, E, K, dtype=dtype)
    rng = np.random.default_rng(9)
    xb = jnp.asarray(rng.standard_normal((B, T, d)), dtype)
    ids = jnp.asarray(rng.integers(0, E, (B, T, K)), jnp.int32)
    w = jnp.asarray(rng.random((B, T, K)), jnp.float32)
    keep = jnp.asarray(rng.random((B, T, K)) < 0.6)
    fn = jax.jit(jax.vmap(lambda x_, i_, w_, k_: masked_moe(x_, wg, wu, wd, i_, w_, k_,
                                                             backend="ffi")))
    y = fn(xb, ids, w, keep)
    ref = jnp.stack([experts_reference(xb[b], wg, wu, wd, ids[b], w[b], keep[b])
                     for b in range(B)])
    assert_matches(y, ref, dtype)
    # x shared, routing batched (in_axes None for x).
    y2 = jax.vmap(lambda i_, w_, k_: masked_moe(x, wg, wu, wd, i_, w_, k_, backend="ffi"))(
        ids, w, keep)
    ref2 = jnp.stack([experts_reference(x, wg, wu, wd, ids[b], w[b], keep[b]) for b in range(B)])
    assert_matches(y2, ref2, dtype)


@needs_ffi
def test_vmap_batched_expert_weights_and_nested():
    B, T, d, f, E, K = 2, 6, 8, 16, 3, 2
    per = [make_inputs(T, d, f, E, K, seed=20 + b) for b in range(B)]
    stacked = [jnp.stack([p[i] for p in per]) for i in range(7)]
    y = jax.vmap(lambda *a: masked_moe(*a, backend="ffi"))(*stacked)
    ref = jnp.stack([experts_reference(*p) for p in per])
    assert_matches(y, ref, jnp.float32)
    # Nested vmap over (outer, inner) token batches with shared weights.
    x, wg, wu, wd, ids, w, keep = make_inputs(2 * 3 * T, d, f, E, K, seed=30)
    r = lambda a: a.reshape(2, 3, T, *a.shape[1:])  # noqa: E731
    inner = jax.vmap(lambda x_, i_, w_, k_: masked_moe(x_, wg, wu, wd, i_, w_, k_, backend="ffi"))
    y = jax.vmap(inner)(r(x), r(ids), r(w), r(keep))
    assert_matches(y.reshape(-1, d), experts_reference(x, wg, wu, wd, ids, w, keep), jnp.float32)


@pytest.mark.parametrize("backend", [None, "ffi", "grouped"])
def test_differentiable(backend):
    # The gradients themselves are checked in tests/test_kernel_vjp.py.
    if backend == "ffi" and not mm.ffi_available():
        pytest.skip("ffi backend not built")
    x, wg, wu, wd, ids, w, keep = make_inputs(4, 8, 16, 3, 2)
    gx = jax.grad(lambda x_: masked_moe(x_, wg, wu, wd, ids, w, keep, backend=backend).sum())(x)
    gr = jax.grad(lambda x_: experts_reference(x_, wg, wu, wd, ids, w, keep).sum())(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gr), atol=1e-5)


def _bad_cases():
    x, wg, wu, wd, ids, w, keep = make_inputs(4, 8, 16, 3, 2)
    ok = dict(x=x, w_gate=wg, w_up=wu, w_down=wd, expert_ids=ids, weights=w, keep=keep)
    cases = {
        "x rank": ("x", x[None]),
        "x int dtype": ("x", x.astype(jnp.int32)),
        "x float64-like": ("x", np.asarray(x, np.float64)),
        "w_gate rank": ("w_gate", wg[0]),
        "w_gate d": ("w_gate", wg[:, :4]),
        "w_up shape": ("w_up", wu[:, :, :8]),
        "w_down shape": ("w_down", wd[:2]),
        "w_down dtype": ("w_down", wd.astype(jnp.bfloat16)),
        "expert_ids int64": ("expert_ids", np.asarray(ids, np.int64)),
        "expert_ids T": ("expert_ids", ids[:3]),
        "expert_ids rank": ("expert_ids", ids[..., None]),
        "weights shape": ("weights", w[:, :1]),
        "weights int": ("weights", w.astype(jnp.int32)),
        "keep dtype": ("keep", keep.astype(jnp.int8)),
        "keep shape": ("keep", keep[:2]),
        "x not array": ("x", [[1.0] * 8] * 4),
    }
    return ok, cases


@pytest.mark.parametrize("case", list(_bad_cases()[1]))
def test_bad_inputs_raise_value_error_naming_the_tensor(case):
    ok, cases = _bad_cases()
    name, bad = cases[case]
    kwargs = dict(ok, **{name: bad})
    for backend in ([None, "ffi"] if mm.ffi_available() else [None]):
        with pytest.raises(ValueError, match=name):
            masked_moe(**kwargs, backend=backend)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        masked_moe(*make_inputs(2, 8, 16, 3, 2), backend="cutlass")


def test_cuda_sources_compiled_when_nvcc_present():
    if mm._ffi is None:
        pytest.skip(f"beam_jax._ffi not built ({mm._FFI_IMPORT_ERROR})")
    if os.environ.get("BEAM_JAX_CUDA", "").lower() in ("0", "off", "false", "no"):
        pytest.skip("BEAM_JAX_CUDA switched off")
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the CUDA kernels are not built")
    assert mm._ffi.cuda_compiled(), "nvcc is present but the extension was built without CUDA"
    # Every forward and backward target on both platforms; the decode-time rows matmul, its packed form, the experts
    # on packed weights, decode attention and the cache update are CPU-only (beam_jax.rows_matmul,
    # beam_jax.packed_experts, beam_jax.decode_attention, beam_jax.cache_update: generate packs only on the CPU
    # backend; on GPU XLA's own ops are used).
    cpu_only = {"beam_rows_matmul", "beam_packed_rows_matmul", "beam_masked_moe_packed", "beam_decode_attention",
                "beam_cache_update"}
    assert set(mm._ffi.cuda_registrations()) == set(mm._ffi.registrations()) - cpu_only
    assert {mm._BWD_TARGET, mm._BWD_FULL_TARGET} <= set(mm._ffi.cuda_registrations())
    assert cpu_only <= set(mm._ffi.registrations())


# Decode-like shapes: every expert's segment has at most 8 rows, so the weights stream through the skinny loop
# (StreamRowsCols, vdpbf16ps under avx512bf16) for the gate/up and the down projections, with column tails of its
# 32-column blocks (f 70, d 300), reductions split into slabs and tails of its 8-row passes (d 300, f 260).
# Segments of 9-64 rows stream too in bfloat16 under avx512bf16 (and take the packed GEMM otherwise); under amx those of
# 8-64 rows stream through AMX tiles (one and two row tiles, passes of 32 rows, reduction and column tails: d 48 and
# 72, f 40 and 56); the last shape has segments past 64 rows. In float32 (weights of at most 512 KB), segments of up to
# 32 rows stream through the register-blocked loop under avx512bf16 and amx (groups of 12 rows, 32-column blocks with
# masked tails: f 40, d 72), up to 8 under avx2 (groups of 6, 16-column blocks, padded tails).
ISA_SHAPES = [(1, 300, 260, 6, 4), (8, 130, 70, 16, 8), (5, 64, 96, 3, 2), (40, 48, 40, 8, 2), (100, 72, 40, 4, 1),
              (70, 40, 56, 3, 2), (150, 24, 40, 2, 2)]


@needs_ffi
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
def test_each_simd_build_matches_reference(cpu_isa, dtype):
    f = jax.jit(lambda *a: masked_moe(*a, backend="ffi"))
    for shape in ISA_SHAPES:
        args = make_inputs(*shape, dtype=dtype, seed=sum(shape))
        assert_matches(f(*args), experts_reference(*args), dtype)


@needs_ffi
def test_amx_tiles_agree_with_the_vdpbf16ps_loop_in_the_experts():
    # Segments of 8-64 rows in bfloat16 through AMX tiles and through vdpbf16ps, same operands (x and the hidden
    # activations rounded to bf16 by both): they differ by summation order only, and the tiles do run (some outputs
    # differ).
    if mm._ffi.best_cpu_isa() != "amx":
        pytest.skip(f"this processor has no amx build to compare (best: {mm._ffi.best_cpu_isa()})")
    args = make_inputs(96, 256, 192, 8, 2, dtype=jnp.bfloat16, keep_p=0.9, seed=5)  # about 20 rows per expert
    f = jax.jit(lambda *a: masked_moe(*a, backend="ffi"))
    try:
        mm._ffi.set_cpu_isa("avx512bf16")
        a = np.asarray(f(*args).astype(jnp.float32))
        mm._ffi.set_cpu_isa("amx")
        b = np.asarray(f(*args).astype(jnp.float32))
    finally:
        mm._ffi.set_cpu_isa(mm._ffi.best_cpu_isa())
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-2 * np.max(np.abs(a)))
    assert (a != b).any()


@needs_ffi
def test_cpu_isa_environment_caps_the_build_and_refuses_typos():
    import subprocess
    import sys

    best = mm._ffi.best_cpu_isa()
    for want in mm.CPU_ISAS:
        env = dict(os.environ, BEAM_JAX_CPU_ISA=want)
        out = subprocess.run([sys.executable, "-c", "from beam_jax import kernel; print(kernel._ffi.cpu_isa())"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == min(want, best, key=mm.CPU_ISAS.index)
    env = dict(os.environ, BEAM_JAX_CPU_ISA="sse4")
    out = subprocess.run([sys.executable, "-c", "import beam_jax.kernel"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "BEAM_JAX_CPU_ISA='sse4': must be one of generic, avx2, avx512bf16, amx" in out.stderr


@needs_ffi
def test_portable_cpu_kernel_matches_reference():
    # The non-AVX2 build of the CPU kernel, forced through BEAM_JAX_CPU_ISA=generic.
    code = (
        "import jax.numpy as jnp, numpy as np\n"
        "from tests.test_kernel import make_inputs, assert_matches, DTYPES\n"
        "from beam_jax import _ffi\n"
        "from beam_jax.kernel import masked_moe\n"
        "from beam_jax.experts import experts_reference\n"
        "assert _ffi.cpu_isa() == 'generic', _ffi.cpu_isa()\n"
        "for dt in DTYPES:\n"
        "    a = make_inputs(37, 40, 70, 5, 3, dtype=dt, seed=8)\n"
        "    assert_matches(masked_moe(*a, backend='ffi'), experts_reference(*a), dt)\n"
        "print('ok')\n")
    run_generic_isa(code)


# --- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("shape", SHAPES + [(257, 128, 192, 8, 2), (64, 256, 512, 128, 8)],
                         ids=str)
def test_cuda_matches_reference(shape, dtype):
    dev = _cuda_devices()[0]
    args = jax.device_put(make_inputs(*shape, dtype=dtype, seed=sum(shape)), dev)
    y = jax.jit(lambda *a: masked_moe(*a, backend="ffi"))(*args)
    assert_matches(y, experts_reference(*args), dtype)
    yp = jax.jit(mm._masked_moe_ffi_poisoned)(*args)
    assert_matches(yp, experts_reference(*args), dtype)


@pytest.mark.gpu
@needs_cuda
def test_cuda_edge_cases():
    dev = _cuda_devices()[0]
    args = list(jax.device_put(make_inputs(9, 16, 24, 4, 2), dev))
    assert masked_moe(*make_inputs(0, 16, 24, 4, 2), backend="ffi").shape == (0, 16)
    dropped = list(args)
    dropped[6] = jnp.zeros_like(args[6])
    np.testing.assert_array_equal(np.asarray(mm._masked_moe_ffi_poisoned(*dropped)), 0.0)
    one = list(args)
    one[4] = jnp.full_like(args[4], 2)
    one[6] = jnp.ones_like(args[6])
    assert_matches(masked_moe(*one, backend="ffi"), experts_reference(*one), jnp.float32)
    B = 3
    xb = jnp.stack([args[0]] * B)
    y = jax.vmap(lambda x_: masked_moe(x_, *args[1:], backend="ffi"))(xb)
    assert_matches(y, jnp.stack([experts_reference(*args)] * B), jnp.float32)
